"""The sandbox: each hostile program is contained, reported, and leaves no process or file behind."""

import os
import socket
import sys
import tempfile
import uuid

import pytest

from fastsft.execution import ExecutionResult, _processes_mentioning, run_program

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox runs on Linux only")


def run(code: str, **kw) -> ExecutionResult:
    result = run_program(code, timeout_s=kw.pop("timeout_s", 2.0), memory_mb=kw.pop("memory_mb", 256), **kw)
    # Nothing may outlive the call: the work dir is gone and no process runs from it.
    assert result.workdir and not os.path.exists(result.workdir)
    assert _processes_mentioning(result.workdir) == []
    return result


def test_clean_exit_passes_and_output_is_captured():
    result = run("import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert result.status == "passed" and result.returncode == 0
    assert result.stdout == "out\n" and result.stderr == "err\n"
    assert "empty environment" in result.protections


def test_failing_assertion_fails():
    result = run("assert 1 + 1 == 3, 'arithmetic'")
    assert result.status == "failed" and "AssertionError: arithmetic" in result.stderr and result.limit is None


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="code must be a str"):
        run_program(b"print(1)")
    with pytest.raises(ValueError, match="timeout_s"):
        run_program("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_program("pass", memory_mb=1)


def test_infinite_loop_times_out():
    result = run("while True:\n    pass", timeout_s=1.0)
    assert result.status == "timeout" and result.limit in ("wall_time", "cpu_time")
    assert result.duration_s < 5


def test_memory_bomb_is_stopped_by_the_memory_limit():
    result = run("chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))", memory_mb=256)
    assert result.status == "failed" and result.limit == "memory", result.stderr[-500:]


def test_fork_bomb_is_contained_and_leaves_no_process():
    code = ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    result = run(code, timeout_s=1.0)
    assert result.status == "timeout"
    if not any(p == "RLIMIT_NPROC" for p in result.protections):
        pytest.fail(f"RLIMIT_NPROC not applied: {result.missing}")


def test_escaped_daemon_is_killed():
    # A child that starts its own session leaves the process group; the PID namespace (or the sweep) ends it.
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')"
    result = run(code)
    assert result.status == "passed" and result.stdout == "parent done\n"


def test_write_outside_the_work_dir_is_refused():
    target = os.path.join(tempfile.gettempdir(), f"fastsft-escape-{uuid.uuid4().hex}")
    result = run(f"open({target!r}, 'w').write('escaped')\n")
    try:
        if not any(p.startswith("landlock") or p == "runs as nobody" for p in result.protections):
            pytest.skip(f"no Landlock and not root here, nothing can refuse the write: {result.missing}")
        assert not os.path.exists(target), f"the sandbox wrote {target}; protections {result.protections}"
        assert result.status == "failed" and "PermissionError" in result.stderr
    finally:
        if os.path.exists(target):
            os.unlink(target)


def test_files_inside_the_work_dir_are_allowed_and_removed():
    result = run("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())")
    assert result.status == "passed" and result.stdout == "ok\n"


def test_parent_secrets_are_not_readable(monkeypatch):
    monkeypatch.setenv("FASTSFT_TEST_SECRET", "hunter2")
    code = ("import os\nprint(os.environ.get('FASTSFT_TEST_SECRET'))\n"
            "try:\n    print(open(f'/proc/{os.getppid()}/environ', 'rb').read())\n"
            "except OSError as e:\n    print('refused', type(e).__name__)\n"
            f"try:\n    print(open('/proc/{os.getpid()}/environ', 'rb').read())\n"
            "except OSError as e:\n    print('refused', type(e).__name__)\n")
    result = run(code)
    assert result.status == "passed", result.stderr
    assert result.stdout.startswith("None\n")  # the environment is always fresh
    fences = ("landlock", "namespaces", "runs as nobody")
    if not any(fence in p for p in result.protections for fence in fences):
        pytest.skip(f"no fence hides /proc/<parent>/environ here: {result.missing}")
    assert "hunter2" not in result.stdout


def test_network_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        result = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')")
    finally:
        server.close()
    if not any("namespaces" in p or "landlock" in p for p in result.protections):
        pytest.skip(f"neither network namespaces nor Landlock here: {result.missing}")
    assert result.status == "failed" and "connected" not in result.stdout


def test_what_could_not_be_applied_is_reported():
    result = run("pass")
    fences = ("namespaces", "landlock", "RLIMIT_NPROC")
    for fence in fences:
        applied = any(fence in p for p in result.protections)
        reported = any(fence.lower() in m.lower() for m in result.missing)
        assert applied != reported, f"{fence}: applied={applied}, reported missing={reported}"


def test_without_namespaces_the_sweep_still_ends_every_process(monkeypatch):
    import fastsft.execution as execution

    monkeypatch.setattr(execution, "_namespace_support", lambda demote: "switched off by the test")
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')"
    result = run(code)
    assert result.status == "passed" and "namespaces: switched off by the test" in result.missing
    assert not any("namespaces" in p for p in result.protections)
