import os

# Keep every lab and test on its small setting unless a developer asks otherwise.
os.environ.setdefault("DISTLAB_SMALL", "1")
