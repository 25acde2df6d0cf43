"""The ``pricegate`` command: the composition root, the only code that imports both gateway and ingest."""
