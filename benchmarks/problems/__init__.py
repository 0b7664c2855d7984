"""Problems the studies share: data sets, models and losses, and one method registry.

* ``data.py``: digits and breast cancer (scikit-learn, offline), standardised splits,
  label corruption;
* ``models.py``: a plain-JAX MLP with dict parameters;
* ``lm.py``: a byte-level decoder (flax NNX) with quantized layers and its stdlib corpus;
* ``cleaning.py``: the hyper-data-cleaning bilevel problem on corrupted digits;
* ``methods.py``: every method a study can name (stability methods chained with an
  optimizer, bilevel solvers), built from the study's config.

A problem used by one study only lives in that study's package.
"""
