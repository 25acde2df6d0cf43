"""Redis wire-level pieces shared by every Redis user in pricegate: the RESP codec and the server-side scripts."""
