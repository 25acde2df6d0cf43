"""Recordings: the file format, the replay source and the ``pricegate record`` recorder."""
