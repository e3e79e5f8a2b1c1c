"""Shipped training recipes (YAML), read by `specdec train --recipe NAME`."""
