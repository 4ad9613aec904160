"""vmjax's native CPU kernels: C++ sources (``onednn_conv.cc``, ``resample.cc``) and
:mod:`vmjax.native.build`, which compiles, caches and loads them. What dispatches to them (and
to XLA elsewhere) is :mod:`vmjax.conv` and :mod:`vmjax.kernels`."""
