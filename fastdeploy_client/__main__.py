"""`python -m fastdeploy_client` is the same as `fdclient`."""
import sys

from fastdeploy_client.cli import main

sys.exit(main())
