"""dift-sfm: DIFT diffusion features as a keypoint describer and matcher for hloc and COLMAP."""

import logging

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
