"""Session-wide test settings: never touch the network, keep torch to the CI machine's two cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The PostgreSQL fixtures (postgres_server, postgres_url, fresh_postgres_url) live in a plain module
# so that every test directory shares one server; importlib import mode needs the path made explicit.
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
pytest_plugins = ["pg_fixture"]
