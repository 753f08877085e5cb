"""Checks of the Terraform in terraform/: formatting, validation, the module's
own offline `terraform test` suite, a mutation check proving that suite can
fail, and a real `terraform apply` of the module against moto's HTTP server.

Everything runs offline. Terraform must be on PATH and the hashicorp/aws
provider must be in a local plugin directory: $S3KV_TF_PLUGIN_DIR, else
/opt/tf-plugins, else the first `registry.terraform.io` directory found on
disk. Without them the tests skip. Terraform only ever runs in copies under
pytest's tmp_path, so the working tree stays clean.

The apply against moto starts in the background as soon as this module's
tests begin: the provider waits tens of seconds for S3 lifecycle rules to
settle, and that wait overlaps with the offline checks.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.s3server import S3Endpoint

REPO = Path(__file__).resolve().parents[2]
MODULE = Path("terraform/modules/s3kv-bucket")
EXAMPLES = (
    Path("terraform/examples/general-purpose"),
    Path("terraform/examples/express-one-zone"),
)
APPLY_FIXTURE = Path("tests/terraform/apply_fixture")

TF_TIMEOUT_S = 300
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
# Only what the copies need; never local state, plans or provider caches.
_COPY_IGNORE = shutil.ignore_patterns(
    ".terraform", ".terraform.lock.hcl", "terraform.tfstate*", "*.tfplan", "__pycache__"
)


# ---------------------------------------------------------------------------
# Locating terraform and the provider
# ---------------------------------------------------------------------------


# Prunes pseudo file systems and per-configuration .terraform directories
# (those only hold links into a real plugin dir).
_FIND_PLUGIN_DIRS = shlex.split(
    "find / ( -path /proc -o -path /sys -o -name .terraform ) -prune"
    " -o -type d -name registry.terraform.io -print"
)


def _has_aws_provider(plugin_dir: Path) -> bool:
    return (plugin_dir / "registry.terraform.io" / "hashicorp" / "aws").is_dir()


@functools.cache
def _plugin_dir() -> tuple[Path | None, str]:
    """(plugin dir, why not found)."""
    configured = os.environ.get("S3KV_TF_PLUGIN_DIR")
    if configured:
        path = Path(configured)
        if _has_aws_provider(path):
            return path, ""
        return None, f"S3KV_TF_PLUGIN_DIR={configured} has no registry.terraform.io/hashicorp/aws"
    default = Path("/opt/tf-plugins")
    if _has_aws_provider(default):
        return default, ""
    try:
        found = subprocess.run(
            _FIND_PLUGIN_DIRS,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        ).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        found = []
    for line in found:
        candidate = Path(line).parent
        if _has_aws_provider(candidate):
            return candidate, ""
    return None, "no local Terraform plugin dir with hashicorp/aws (set S3KV_TF_PLUGIN_DIR)"


def _tool_problem() -> str | None:
    if shutil.which("terraform") is None:
        return "terraform is not on PATH"
    plugin_dir, why = _plugin_dir()
    return why if plugin_dir is None else None


@pytest.fixture(scope="module")
def plugin_dir() -> Path:
    problem = _tool_problem()
    if problem:
        pytest.skip(problem)
    path, _ = _plugin_dir()
    assert path is not None
    return path


@pytest.fixture(scope="module")
def tf_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for terraform: no checkpoint calls, an empty CLI config
    (providers come from -plugin-dir only), no inherited TF_CLI_ARGS."""
    cli_config = tmp_path_factory.mktemp("tfcli") / "terraformrc"
    cli_config.write_text("")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TF_CLI_ARGS", "TF_VAR_")) and k not in ("TF_DATA_DIR", "TF_WORKSPACE")
    }
    env.update(
        TF_CLI_CONFIG_FILE=str(cli_config),
        CHECKPOINT_DISABLE="1",
        TF_IN_AUTOMATION="1",
        TF_INPUT="0",
    )
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TF_TIMEOUT_S, check=False
    )


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed ({proc.returncode}):\n{output}"
    return output


def _copy_tree(dest: Path, *parts: Path) -> Path:
    """Copy repository paths into dest, keeping their relative layout (the
    examples and the apply fixture refer to the module by relative path)."""
    for part in parts:
        shutil.copytree(REPO / part, dest / part, ignore=_COPY_IGNORE)
    return dest


def _init(workdir: Path, plugin_dir: Path, env: dict[str, str], *, backend: bool = False) -> None:
    args = ["terraform", "init", "-input=false", "-no-color", f"-plugin-dir={plugin_dir}"]
    if not backend:
        args.append("-backend=false")
    _ok(_run(args, workdir, env))


# ---------------------------------------------------------------------------
# Apply against moto, started in the background
# ---------------------------------------------------------------------------


@dataclass
class AppliedStack:
    workdir: Path
    endpoint: str
    bucket: str
    env: dict[str, str]
    proc: subprocess.Popen[str] | None = None
    log: Path | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    destroyed: bool = False

    def var_args(self) -> list[str]:
        return [f"-var=endpoint={self.endpoint}", f"-var=bucket_name={self.bucket}"]

    def start(self) -> None:
        self.log = self.workdir / "apply.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    "terraform",
                    "apply",
                    "-auto-approve",
                    "-input=false",
                    "-no-color",
                    *self.var_args(),
                ],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def wait(self) -> dict[str, Any]:
        if not self.outputs:
            assert self.proc is not None and self.log is not None
            rc = self.proc.wait(timeout=TF_TIMEOUT_S)
            assert rc == 0, f"terraform apply against moto failed ({rc}):\n{self.log.read_text()}"
            raw = _ok(_run(["terraform", "output", "-json"], self.workdir, self.env))
            self.outputs = {k: v["value"] for k, v in json.loads(raw).items()}
        return self.outputs

    def destroy(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.wait(timeout=TF_TIMEOUT_S)
        self.destroyed = True
        # -refresh=false: the state was just written by apply; re-reading
        # every resource would only slow the test down.
        return _ok(
            _run(
                [
                    "terraform",
                    "destroy",
                    "-auto-approve",
                    "-input=false",
                    "-no-color",
                    "-refresh=false",
                    *self.var_args(),
                ],
                self.workdir,
                self.env,
            )
        )


def _needs_apply(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(item, "module", None) is request.module
        and "applied_stack" in getattr(item, "fixturenames", ())
        for item in request.session.items
    )


@pytest.fixture(scope="module", autouse=True)
def _background_apply(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[AppliedStack | None]:
    """Start `terraform apply` of the apply fixture right away (if a selected
    test needs it and the tools are there); `applied_stack` waits for it."""
    if not _needs_apply(request) or _tool_problem():
        yield None
        return
    try:
        import moto.server  # noqa: F401
    except ImportError:
        yield None
        return
    plugin_dir: Path = request.getfixturevalue("plugin_dir")
    env: dict[str, str] = {**request.getfixturevalue("tf_env"), **FAKE_CREDENTIALS}
    env.pop("AWS_PROFILE", None)
    endpoint: S3Endpoint = request.getfixturevalue("moto_endpoint")

    root = _copy_tree(tmp_path_factory.mktemp("apply"), MODULE, APPLY_FIXTURE)
    stack = AppliedStack(
        workdir=root / APPLY_FIXTURE,
        endpoint=endpoint.url,
        bucket=f"s3kv-tf-{uuid.uuid4().hex[:10]}",
        env=env,
    )
    _init(stack.workdir, plugin_dir, env, backend=True)
    stack.start()
    try:
        yield stack
    finally:
        if not stack.destroyed:
            stack.destroy()


@pytest.fixture(scope="module")
def applied_stack(_background_apply: AppliedStack | None) -> AppliedStack:
    if _background_apply is None:
        problem = _tool_problem()
        pytest.skip(problem or "moto is not installed")
    _background_apply.wait()
    return _background_apply


# ---------------------------------------------------------------------------
# Static checks
# ---------------------------------------------------------------------------


def test_fmt(plugin_dir: Path, tf_env: dict[str, str]) -> None:
    for path in ("terraform", str(APPLY_FIXTURE)):
        _ok(
            _run(
                ["terraform", "fmt", "-check", "-recursive", "-diff", "-no-color", path],
                REPO,
                tf_env,
            )
        )


@pytest.fixture(scope="module")
def module_copy(
    plugin_dir: Path, tf_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    workdir = _copy_tree(tmp_path_factory.mktemp("module"), MODULE) / MODULE
    _init(workdir, plugin_dir, tf_env)
    return workdir


def test_validate_module(module_copy: Path, tf_env: dict[str, str]) -> None:
    _ok(_run(["terraform", "validate", "-no-color"], module_copy, tf_env))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_validate_example(
    example: Path, plugin_dir: Path, tf_env: dict[str, str], tmp_path: Path
) -> None:
    workdir = _copy_tree(tmp_path, MODULE, example) / example
    _init(workdir, plugin_dir, tf_env)
    _ok(_run(["terraform", "validate", "-no-color"], workdir, tf_env))


def test_module_tests_pass(module_copy: Path, tf_env: dict[str, str]) -> None:
    output = _ok(_run(["terraform", "test", "-no-color"], module_copy, tf_env))
    assert "Success!" in output and " 0 failed" in output, output
    for test_file in ("general_purpose", "directory", "validation"):
        assert f"tests/{test_file}.tftest.hcl... pass" in output, output


# ---------------------------------------------------------------------------
# Mutation checks: break the module, the offline suite must notice
# ---------------------------------------------------------------------------


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def remove_enclosing_objects(text: str, anchor: str) -> str:
    """Delete every HCL object literal (`{ ... }` on their own lines, as
    `terraform fmt` writes list elements) that directly contains `anchor`."""
    lines = text.splitlines(keepends=True)
    while (hit := next((i for i, line in enumerate(lines) if anchor in line), None)) is not None:
        start = hit
        depth = _indent(lines[hit])
        while not (lines[start].rstrip().endswith("{") and _indent(lines[start]) < depth):
            start -= 1
        end = hit
        depth = _indent(lines[start])
        while not (lines[end].lstrip().startswith("}") and _indent(lines[end]) == depth):
            end += 1
        del lines[start : end + 1]
    return "".join(lines)


def _without_tls_deny(main_tf: str) -> str:
    return remove_enclosing_objects(main_tf, 'Sid       = "DenyInsecureTransport"')


def _public_access_allowed(main_tf: str) -> str:
    return main_tf.replace("restrict_public_buckets = true", "restrict_public_buckets = false")


def _engine_may_delete(iam_tf: str) -> str:
    return iam_tf.replace('"s3:PutObject",', '"s3:PutObject",\n            "s3:DeleteObject",', 1)


MUTATIONS = {
    # id: (file, mutate, the assertion message that must fire)
    "no_tls_deny": ("main.tf", _without_tls_deny, "must deny requests without TLS"),
    "public_access_allowed": (
        "main.tf",
        _public_access_allowed,
        "public access block settings must be true",
    ),
    "engine_may_delete": (
        "iam.tf",
        _engine_may_delete,
        "engine policy must not allow s3:DeleteObject",
    ),
}


def test_remove_enclosing_objects() -> None:
    text = (
        'a = [\n  {\n    Sid = "X"\n    C = {\n      k = 1\n    }\n  },\n'
        '  {\n    Sid = "Y"\n  },\n]\n'
    )
    assert remove_enclosing_objects(text, 'Sid = "X"') == 'a = [\n  {\n    Sid = "Y"\n  },\n]\n'


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_module_tests_catch_mutation(
    mutation: str, plugin_dir: Path, tf_env: dict[str, str], tmp_path: Path
) -> None:
    filename, mutate, expected_message = MUTATIONS[mutation]
    workdir = _copy_tree(tmp_path, MODULE) / MODULE
    target = workdir / filename
    original = target.read_text()
    mutated = mutate(original)
    assert mutated != original, f"mutation {mutation} did not apply to {filename}"
    if mutation == "no_tls_deny":
        assert "aws:SecureTransport" not in mutated
    target.write_text(mutated)

    _init(workdir, plugin_dir, tf_env)
    # The general-purpose suite covers all three mutations; the other files
    # only add run time here.
    proc = _run(
        ["terraform", "test", "-no-color", "-filter=tests/general_purpose.tftest.hcl"],
        workdir,
        tf_env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"terraform test passed although {mutation} was applied:\n{output}"
    # Failing for the right reason: an assertion, not a broken configuration.
    assert "Test assertion failed" in output, output
    assert expected_message in " ".join(output.split()), output


# ---------------------------------------------------------------------------
# Real apply against moto (S3, IAM and STS on one local HTTP endpoint)
# ---------------------------------------------------------------------------


def _statements(policy: str | dict[str, Any]) -> list[dict[str, Any]]:
    document = json.loads(policy) if isinstance(policy, str) else policy
    statements = document["Statement"]
    return statements if isinstance(statements, list) else [statements]


def _actions(statement: dict[str, Any]) -> list[str]:
    action = statement["Action"]
    return [action] if isinstance(action, str) else list(action)


def _session() -> boto3.session.Session:
    return boto3.session.Session(
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=FAKE_CREDENTIALS["AWS_DEFAULT_REGION"],
    )


def _is_transport_rule(statement: dict[str, Any]) -> bool:
    condition = statement.get("Condition", {})
    return "aws:SecureTransport" in condition.get("Bool", {}) or "s3:TlsVersion" in condition.get(
        "NumericLessThan", {}
    )


def test_apply_creates_hardened_bucket(applied_stack: AppliedStack) -> None:
    outputs = applied_stack.outputs
    bucket = applied_stack.bucket
    s3 = _session().client("s3", endpoint_url=applied_stack.endpoint)
    iam = _session().client("iam", endpoint_url=applied_stack.endpoint)

    assert outputs["bucket_name"] == bucket
    assert outputs["bucket_arn"] == f"arn:aws:s3:::{bucket}"
    s3.head_bucket(Bucket=bucket)

    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert block == {
        "BlockPublicAcls": True,
        "IgnorePublicAcls": True,
        "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True,
    }

    tls_denies = [
        s
        for s in _statements(s3.get_bucket_policy(Bucket=bucket)["Policy"])
        if s["Effect"] == "Deny"
        and s.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"
    ]
    assert len(tls_denies) == 1
    assert "s3:*" in _actions(tls_denies[0])
    # moto evaluates bucket policies and this endpoint is plain HTTP, so the
    # TLS-only policy must refuse a write even with valid credentials.
    with pytest.raises(ClientError) as denied:
        s3.put_object(Bucket=bucket, Key="s3kv/plain-http-probe", Body=b"x")
    assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

    ownership = s3.get_bucket_ownership_controls(Bucket=bucket)["OwnershipControls"]["Rules"]
    assert ownership == [{"ObjectOwnership": "BucketOwnerEnforced"}]

    encryption = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]
    assert encryption["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"

    assert "Status" not in s3.get_bucket_versioning(Bucket=bucket), "versioning must stay off"

    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
    assert rules["abort-incomplete-multipart-uploads"]["AbortIncompleteMultipartUpload"] == {
        "DaysAfterInitiation": 1
    }
    assert rules["expire-s3kv-cache"]["Expiration"]["Days"] == 7
    assert rules["expire-s3kv-cache"]["Filter"]["Prefix"] == "s3kv/"

    def policy_document(arn: str) -> dict[str, Any]:
        version = iam.get_policy(PolicyArn=arn)["Policy"]["DefaultVersionId"]
        version_info = iam.get_policy_version(PolicyArn=arn, VersionId=version)
        document = version_info["PolicyVersion"]["Document"]
        return json.loads(document) if isinstance(document, str) else dict(document)

    def allowed_actions(arn: str) -> set[str]:
        return {a for s in _statements(policy_document(arn)) for a in _actions(s)}

    engine_actions = allowed_actions(outputs["engine_policy_arn"])
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= engine_actions
    assert not any(a.startswith("s3:Delete") or "*" in a for a in engine_actions)
    gc_actions = allowed_actions(outputs["gc_policy_arn"])
    assert "s3:DeleteObject" in gc_actions and "s3:PutObject" not in gc_actions

    role_name = outputs["engine_role_arn"].rsplit("/", 1)[-1]
    attached = iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]
    assert [p["PolicyArn"] for p in attached] == [outputs["engine_policy_arn"]]

    assert json.loads(outputs["kv_transfer_config"]) == {
        "kv_connector": "S3KVConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"bucket": bucket, "prefix": "s3kv", "region": "us-east-1"},
    }


def _doctor_available(env: dict[str, str]) -> bool:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "s3kv.cli", "doctor", "--help"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def test_doctor_on_applied_bucket(applied_stack: AppliedStack) -> None:
    env = {**os.environ, **FAKE_CREDENTIALS, "PYTHONPATH": str(REPO)}
    env.pop("AWS_PROFILE", None)
    if not _doctor_available(env):
        pytest.skip("s3kv CLI doctor not available")

    # The emulator only speaks plain HTTP, which the TLS-only bucket policy
    # rightly refuses (see test_apply_creates_hardened_bucket). Lift just the
    # transport rules while the doctor runs, as if the endpoint were HTTPS;
    # every other setting of the module stays as applied.
    s3 = _session().client("s3", endpoint_url=applied_stack.endpoint)
    bucket = applied_stack.bucket
    original = s3.get_bucket_policy(Bucket=bucket)["Policy"]
    kept = [s for s in _statements(original) if not _is_transport_rule(s)]
    if kept:
        s3.put_bucket_policy(
            Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": kept})
        )
    else:
        s3.delete_bucket_policy(Bucket=bucket)
    doctor = [sys.executable, "-m", "s3kv.cli", "doctor", "--bucket", bucket]
    doctor += ["--endpoint-url", applied_stack.endpoint, "--prefix", "s3kv"]
    try:
        proc = subprocess.run(
            doctor,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        s3.put_bucket_policy(Bucket=bucket, Policy=original)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_destroy_removes_the_bucket(applied_stack: AppliedStack) -> None:
    applied_stack.destroy()
    s3 = _session().client("s3", endpoint_url=applied_stack.endpoint)
    with pytest.raises(ClientError):
        s3.head_bucket(Bucket=applied_stack.bucket)
