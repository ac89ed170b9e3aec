"""The Judge0 Python SDK's public API against TVM, with TVM's language ids.

The SDK's own tests use language aliases that map to Judge0 versions TVM does
not have (see 30-compat-clients.sh); these run the same SDK code paths with
ids TVM lists: single runs, test cases, batches larger than one batch (20),
fields=*, base64 both ways, and the informational endpoints.
"""

import judge0
from judge0 import Status, Submission

PYTHON_3_11 = 92  # Judge0's own id for Python 3.11
C_GCC_14 = 103  # Judge0's own id for C (GCC 14)


def test_client_reads_languages_config_and_statuses(ce_client):
    ids = {lang.id for lang in ce_client.languages}
    assert PYTHON_3_11 in ids and C_GCC_14 in ids
    assert 71 not in ids  # Python 3.8.1 cannot run here
    assert ce_client.config.max_submission_batch_size == 20
    assert ce_client.get_language(PYTHON_3_11).name.startswith("Python (3.11.")
    assert len(ce_client.get_statuses()) == 14
    assert ce_client.get_about()["version"] == "1.14.0"


def test_run_with_test_cases(ce_client):
    results = judge0.run(
        client=ce_client,
        source_code="print(f'Hello, {input()}')",
        language=PYTHON_3_11,
        test_cases=[("Judge0", "Hello, Judge0"), ("pytest", "Hello, nobody")],
    )
    assert [r.status for r in results] == [Status.ACCEPTED, Status.WRONG_ANSWER]
    assert results[0].stdout == "Hello, Judge0\n"
    assert results[0].time is not None and results[0].memory > 0


def test_compile_error_and_runtime_error(ce_client):
    bad = judge0.run(client=ce_client, source_code="int main( {", language=C_GCC_14)
    assert bad.status == Status.COMPILATION_ERROR
    assert "error" in bad.compile_output
    crash = judge0.run(client=ce_client, source_code="import sys; sys.exit(2)", language=PYTHON_3_11)
    assert crash.status == Status.RUNTIME_ERROR_NZEC
    assert crash.exit_code == 2


def test_batches_larger_than_one_batch(ce_client):
    submissions = [
        Submission(source_code=f"print({i})", language=PYTHON_3_11, expected_output=f"{i}")
        for i in range(21)
    ]
    results = judge0.run(client=ce_client, submissions=submissions)
    assert len(results) == 21
    assert all(r.status == Status.ACCEPTED for r in results)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(21)]
