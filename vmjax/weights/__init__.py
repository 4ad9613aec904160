"""Shipped pretrained models (data files; see ``vmjax/pretrained.py``)."""
