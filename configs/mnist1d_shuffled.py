"""MNIST-1D with its 40 time steps shuffled by one fixed permutation (the MNIST-1D paper's
shuffled variant): the same signals without their spatial order, so local patterns are gone
and the model must relate distant steps. Otherwise exactly configs/mnist1d.py; the trivial
baseline is still accuracy 0.1.
"""

import importlib.util
import os


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist1d.py")
    spec = importlib.util.spec_from_file_location("mnist1d_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.task.shuffled = True
    return c
