"""Native CPU kernels (C++ sources built on first use; see ``vmjax/conv.py``)."""
