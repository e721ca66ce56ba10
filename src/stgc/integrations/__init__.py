"""STGC's core run by training loops other than Lightning's (stgc.callback is Lightning's)."""
