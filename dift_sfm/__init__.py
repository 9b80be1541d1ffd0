"""dift-sfm: DIFT diffusion features as a keypoint describer and matcher for hloc and COLMAP."""

import logging

from .runtime import apply_thread_policy

# Before anything imports torch: its OpenMP threads must not spin while the machine is shared
# (see dift_sfm.runtime; values the user set are kept).
apply_thread_policy()

__version__ = "0.1.0"

logger = logging.getLogger("dift_sfm")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(
        logging.Formatter("[%(asctime)s dift_sfm %(levelname)s] %(message)s", "%Y/%m/%d %H:%M:%S")
    )
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
