"""Shared code of the MoRE example scripts (`examples/*.py`): data, training, evaluation, metrics, statistics, model
cards and timing. The scripts are thin command lines over these modules; install with `pip install -e .`."""
