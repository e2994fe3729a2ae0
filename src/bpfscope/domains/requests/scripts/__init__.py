"""Ready PxL-style scripts (``bpfscope query --script NAME``): each file is a script, run with ``px`` as
bpfscope's DataFrame API (pxl.py); never imported as a module."""
