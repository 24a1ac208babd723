import os

# Tests never reach a model hub: everything they load is built by the tests or shipped in a package.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
