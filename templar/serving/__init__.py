"""Triton Python-backend models of the served path. The generated `model.py` files in a model repository only import
the classes defined here, so the templating code is the same in the server and in the trainer."""
