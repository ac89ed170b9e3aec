"""The `ce_client` fixture the Judge0 SDK's tests expect, pointed at TVM.

The SDK's sdist ships its tests without this fixture; like the SDK's own
conftest, it builds a client from JUDGE0_CE_ENDPOINT and JUDGE0_CE_AUTH_HEADERS.
"""

import json
import os

import pytest
from judge0 import clients


@pytest.fixture(scope="session")
def ce_client():
    endpoint = os.environ["JUDGE0_CE_ENDPOINT"]
    headers = json.loads(os.environ.get("JUDGE0_CE_AUTH_HEADERS", "{}"))
    return clients.Client(endpoint=endpoint, headers=headers)
