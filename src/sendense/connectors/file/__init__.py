"""The ``file`` source: raw or qcow2 images and block devices the node reads."""
