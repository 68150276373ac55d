import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import hf_fixtures directly
torch.set_num_threads(int(os.environ.get("DSALITE_TEST_THREADS", "2")))
