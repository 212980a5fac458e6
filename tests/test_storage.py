"""Object storage: local paths and S3 (moto), with one-line errors that never leak secrets."""

from __future__ import annotations

import json
import os
import socket
import uuid

import pyarrow.fs as pafs
import pytest

from lepton_ray import storage
from lepton_ray.errors import NotFoundError, StorageError
from lepton_ray.storage import Location, explain, redact, resolve

SECRET = os.environ["AWS_SECRET_ACCESS_KEY"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_tmp_files(root) -> bool:
    return not [p for p in root.rglob("*") if ".tmp-" in p.name]


# --- local -----------------------------------------------------------------------------------
def test_local_write_read_exists_listdir_delete(tmp_path):
    root = resolve(tmp_path / "store")
    assert isinstance(root.fs, pafs.LocalFileSystem) and not root.is_s3
    assert not root.exists() and root.listdir() == []

    root.join("a.bin").write_bytes(b"alpha")
    root.join("sub/b.json").write_json({"x": [1, 2]})
    assert root.exists() and root.is_dir()
    assert root.join("a.bin").exists() and not root.join("a.bin").is_dir()
    assert root.join("a.bin").read_bytes() == b"alpha"
    assert root.join("sub", "b.json").read_json() == {"x": [1, 2]}
    assert (tmp_path / "store" / "a.bin").read_bytes() == b"alpha"
    assert root.listdir() == ["a.bin", "sub"]
    assert root.join("sub").listdir() == ["b.json"]

    root.join("a.bin").delete()
    assert not root.join("a.bin").exists()
    root.join("sub").delete()  # a whole tree
    assert root.listdir() == []
    root.join("missing").delete()  # deleting nothing is fine


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    loc = resolve(tmp_path / "d" / "obj")
    loc.write_bytes(b"v1")
    loc.write_bytes(b"version two")
    assert loc.read_bytes() == b"version two"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["obj"]
    assert _no_tmp_files(tmp_path)


def test_upload_file_returns_sha256(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"some bytes")
    loc = resolve(tmp_path / "dst" / "copy.bin")
    assert loc.upload_file(src) == storage.sha256_bytes(b"some bytes")
    assert loc.read_bytes() == b"some bytes"
    assert _no_tmp_files(tmp_path)


def test_write_json_is_stable(tmp_path):
    loc = resolve(tmp_path / "m.json")
    loc.write_json({"b": 1, "a": 2})
    assert json.loads(loc.read_bytes()) == {"a": 2, "b": 1}
    assert loc.read_bytes().decode().index('"a"') < loc.read_bytes().decode().index('"b"')


def test_local_missing_file_is_not_found(tmp_path):
    with pytest.raises(NotFoundError, match=f"^not found: {tmp_path.resolve()}/nope$"):
        resolve(tmp_path / "nope").read_bytes()
    assert issubclass(NotFoundError, StorageError)  # callers that catch StorageError still do


def test_local_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    resolve(tmp_path / "d" / "obj").write_bytes(b"durable")
    assert events == [("fsync", "file"), ("replace", "obj"), ("fsync", "dir")]
    assert (tmp_path / "d" / "obj").read_bytes() == b"durable" and _no_tmp_files(tmp_path)


def test_failed_local_write_leaves_the_old_object_and_no_temp_file(tmp_path, monkeypatch):
    loc = resolve(tmp_path / "obj")
    loc.write_bytes(b"old")

    def broken(fd):
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(StorageError, match=f"^storage error at {loc.uri}: No space left"):
        loc.write_bytes(b"new")
    assert loc.read_bytes() == b"old" and _no_tmp_files(tmp_path)


# --- no path escapes -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "parts",
    [
        ("..",),
        ("../victim",),
        ("a/../../victim",),
        ("a", ".."),
        ("/etc/passwd",),
        ("",),
        ("a//b",),
        ("a/",),
        (".",),
        ("a\\..\\b",),
        ("a\x00b",),
        (),
    ],
)
def test_join_refuses_parts_that_would_escape(parts, tmp_path):
    root = resolve(tmp_path / "store")
    with pytest.raises(StorageError, match="refusing|no path to join") as info:
        root.join(*parts)
    assert "\n" not in str(info.value) and root.uri in str(info.value)


def test_join_refuses_escapes_on_s3_too():
    root = resolve("s3://bucket/runs", endpoint_url="http://127.0.0.1:1")
    with pytest.raises(StorageError, match="refusing path '../datasets' under s3://bucket/runs"):
        root.join("../datasets")
    with pytest.raises(StorageError, match="has '.' or '..' parts"):
        resolve("s3://bucket/runs/../datasets", endpoint_url="http://127.0.0.1:1")


def test_delete_never_leaves_its_location(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    root = resolve(tmp_path / "store")
    root.join("a/b").write_bytes(b"x")
    (tmp_path / "store" / "link").symlink_to(victim, target_is_directory=True)
    (tmp_path / "store" / "a" / "inner").symlink_to(victim, target_is_directory=True)
    root.join("link").delete()  # the link goes, not what it points to
    assert not (tmp_path / "store" / "link").exists() and (victim / "keep.txt").exists()
    root.delete()  # a tree holding a link to a folder outside it
    assert not (tmp_path / "store").exists() and (victim / "keep.txt").read_text() == "precious"
    with pytest.raises(StorageError, match="^refusing to delete /: it is a bucket or disk root$"):
        resolve("/").delete()
    with pytest.raises(StorageError, match="refusing to delete s3://bucket: it is a bucket"):
        resolve("s3://bucket", endpoint_url="http://127.0.0.1:1").delete()


# --- (filesystem, path) -> Location ----------------------------------------------------------
def test_from_filesystem_local(tmp_path):
    loc = Location.from_filesystem(pafs.LocalFileSystem(), f"{tmp_path}/a/../b")
    assert loc.path == loc.uri == f"{tmp_path}/b" and not loc.is_s3
    with pytest.raises(StorageError, match="is not absolute"):
        Location.from_filesystem(pafs.LocalFileSystem(), "relative/x")


def test_from_filesystem_s3_gives_an_s3_uri(s3_server):
    fs = resolve("s3://bucket/x", endpoint_url=s3_server).fs
    loc = Location.from_filesystem(fs, "bucket/runs/r/checkpoint_epoch0001_step0000010", s3_server)
    assert loc.is_s3 and loc.uri == "s3://bucket/runs/r/checkpoint_epoch0001_step0000010"
    assert loc.endpoint_url == s3_server
    assert loc.join("manifest.json").uri == loc.uri + "/manifest.json"
    assert loc.parent.uri == "s3://bucket/runs/r" and loc.name.startswith("checkpoint_epoch")


def test_from_filesystem_refuses_other_filesystems(tmp_path):
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    with pytest.raises(StorageError, match="unsupported filesystem 'subtree'"):
        Location.from_filesystem(sub, "x")


def test_is_s3_follows_the_filesystem_not_the_text(tmp_path):
    assert not Location(pafs.LocalFileSystem(), str(tmp_path), "s3://looks/like/s3").is_s3


def test_ensure_writable_creates_local_folder(tmp_path):
    resolve(tmp_path / "new" / "deep").ensure_writable()
    assert (tmp_path / "new" / "deep").is_dir()


def test_resolve_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = resolve("rel/x")
    assert loc.path == str(tmp_path.resolve() / "rel" / "x")
    assert loc.uri == loc.path and loc.endpoint_url is None


def test_resolve_file_uri(tmp_path):
    loc = resolve(f"file://{tmp_path}/a/b")
    assert loc.path == str(tmp_path.resolve() / "a" / "b")
    assert isinstance(loc.fs, pafs.LocalFileSystem)
    loc.write_bytes(b"ok")
    assert (tmp_path / "a" / "b").read_bytes() == b"ok"


def test_resolve_passes_locations_through(tmp_path):
    loc = resolve(tmp_path)
    assert resolve(loc) is loc
    assert str(loc) == loc.uri


def test_resolve_errors():
    with pytest.raises(StorageError, match="unsupported storage URI scheme 'gs://'"):
        resolve("gs://bucket/x")
    with pytest.raises(StorageError, match="empty storage URI"):
        resolve("")
    with pytest.raises(StorageError, match="S3 URI has no bucket"):
        resolve("s3:///x")


def test_s3_uri_canonical_form(s3_server):
    loc = resolve("s3a://bucket/some/prefix/", endpoint_url=s3_server)
    assert loc.is_s3 and loc.uri == "s3://bucket/some/prefix" and loc.path == "bucket/some/prefix"
    assert loc.endpoint_url == s3_server
    child = loc.join("x", "y.json")
    assert (
        child.uri == "s3://bucket/some/prefix/x/y.json"
        and child.path == "bucket/some/prefix/x/y.json"
    )
    assert child.endpoint_url == s3_server


def test_default_store(monkeypatch, tmp_path):
    monkeypatch.setenv("LEPTON_STORE", str(tmp_path))
    assert storage.default_store() == str(tmp_path)
    monkeypatch.delenv("LEPTON_STORE")
    assert storage.default_store().endswith(os.path.join(".lepton_ray", "store"))


# --- S3 (moto) -------------------------------------------------------------------------------
def test_s3_write_read_listdir_delete(s3_server, s3_bucket):
    root = resolve(f"s3://{s3_bucket}/prefix", endpoint_url=s3_server)
    root.ensure_writable()
    root.join("a.bin").write_bytes(b"alpha")
    root.join("sub/b.json").write_json({"k": "v"})
    assert root.join("a.bin").read_bytes() == b"alpha"
    assert root.join("sub/b.json").read_json() == {"k": "v"}
    assert root.join("a.bin").exists()
    assert root.listdir() == ["a.bin", "sub"]
    assert root.join("sub").listdir() == ["b.json"]
    root.join("a.bin").write_bytes(b"overwritten")
    assert root.join("a.bin").read_bytes() == b"overwritten"
    root.join("a.bin").delete()
    assert not root.join("a.bin").exists()
    assert root.join("nothing-here").listdir() == []


def test_s3_missing_object(s3_server, s3_bucket):
    loc = resolve(f"s3://{s3_bucket}/no/such/key", endpoint_url=s3_server)
    assert not loc.exists()
    with pytest.raises(NotFoundError) as info:
        loc.read_bytes()
    assert str(info.value) == f"not found: s3://{s3_bucket}/no/such/key"


def test_s3_missing_bucket(s3_server):
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    loc = resolve(f"s3://{bucket}/x/y", endpoint_url=s3_server)
    with pytest.raises(StorageError, match=f"bucket '{bucket}' does not exist"):
        loc.ensure_writable()
    with pytest.raises(StorageError, match=f"bucket '{bucket}' does not exist") as info:
        loc.read_bytes()
    assert not isinstance(info.value, NotFoundError)  # a missing bucket is a setup mistake


def test_s3_unreachable_endpoint(monkeypatch):
    monkeypatch.setenv("LEPTON_S3_CONNECT_TIMEOUT", "1")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    loc = resolve("s3://bucket/key", endpoint_url=endpoint)
    with pytest.raises(StorageError) as info:
        loc.read_bytes()
    msg = str(info.value)
    assert "cannot reach" in msg and endpoint in msg and "s3://bucket/key" in msg
    assert SECRET not in msg


@pytest.mark.parametrize("env", ["LEPTON_S3_ENDPOINT", "AWS_ENDPOINT_URL"])
def test_s3_endpoint_from_env(env, s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv(env, s3_server)
    loc = resolve(f"s3://{s3_bucket}/from-env.txt")
    assert loc.endpoint_url == s3_server
    loc.write_bytes(b"via env")
    # The object really went to the moto server: read it back with an explicit endpoint.
    monkeypatch.delenv(env)
    assert (
        resolve(f"s3://{s3_bucket}/from-env.txt", endpoint_url=s3_server).read_bytes() == b"via env"
    )


def test_endpoint_precedence(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-endpoint:1")
    assert storage.endpoint_from_env() == "http://aws-endpoint:1"
    monkeypatch.setenv("LEPTON_S3_ENDPOINT", "http://lepton-endpoint:2")
    assert storage.endpoint_from_env() == "http://lepton-endpoint:2"
    assert storage.endpoint_from_env("http://arg:3") == "http://arg:3"
    monkeypatch.delenv("LEPTON_S3_ENDPOINT")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert storage.endpoint_from_env() is None


def test_invalid_endpoint():
    with pytest.raises(StorageError, match="invalid S3 endpoint URL"):
        resolve("s3://bucket/x", endpoint_url="http://")


# --- secrets ---------------------------------------------------------------------------------
def test_redact_removes_secret_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-abc-456")
    text = redact("auth failed for s3cr3t-value-123 with token-abc-456 (s3cr3t-value-123)")
    assert "s3cr3t-value-123" not in text and "token-abc-456" not in text
    assert text == "auth failed for *** with *** (***)"
    assert redact("nothing to hide") == "nothing to hide"


def test_explain_never_leaks_the_secret(monkeypatch, tmp_path):
    secret = "very-secret-value-789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3 = resolve("s3://bucket/key", endpoint_url="http://127.0.0.1:1")  # never contacted
    local = resolve(tmp_path / "f")
    for exc, loc in [
        (OSError(f"weird failure signing with {secret}"), s3),
        (OSError(f"AWS Error ACCESS_DENIED: key {secret} rejected"), s3),
        (OSError(f"curl error: couldn't connect ({secret})"), s3),
        (ValueError(f"bad value {secret}\nsecond line"), local),
    ]:
        msg = str(explain(exc, loc))
        assert secret not in msg
        assert "\n" not in msg


def test_explain_classifies_errors(tmp_path):
    s3 = resolve("s3://bucket/key", endpoint_url="http://ep:1")  # never contacted
    assert (
        str(explain(OSError("AWS Error NO_SUCH_BUCKET"), s3))
        == "bucket 'bucket' does not exist (s3://bucket/key via http://ep:1)"
    )
    assert str(explain(OSError("HTTP response code: 403"), s3)).startswith(
        "access denied to s3://bucket/key"
    )
    assert (
        str(explain(OSError("Connection refused"), s3))
        == "cannot reach the S3 endpoint http://ep:1 for s3://bucket/key"
    )
    local = resolve(tmp_path / "x")
    assert str(explain(PermissionError("nope"), local)) == f"permission denied: {local.uri}"
    assert (
        str(explain(OSError("disk on fire\nmore"), local))
        == f"storage error at {local.uri}: disk on fire"
    )
    err = StorageError("already explained")
    assert explain(err, local) is err


# --- rejected credentials (moto with IAM authentication on) ----------------------------------
@pytest.fixture
def moto_auth(s3_server, monkeypatch):
    """Turn moto's IAM checks on for this test and create a user whose key moto accepts.

    ``INITIAL_NO_AUTH_ACTION_COUNT`` is read by ``moto.settings`` at import time, so (the moto
    server running in this process) the setting is patched directly, which is what the
    environment variable would have set.
    """
    import boto3
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    iam = boto3.client("iam", endpoint_url=s3_server, region_name="us-east-1")
    user = f"lepton-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(
        UserName=user,
        PolicyName="s3-all",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
            }
        ),
    )
    key = iam.create_access_key(UserName=user)["AccessKey"]
    bucket = f"lepton-auth-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    return bucket, key["AccessKeyId"], key["SecretAccessKey"]


def test_s3_accepted_credentials(moto_auth, s3_server, monkeypatch):
    bucket, key_id, secret = moto_auth
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    loc = resolve(f"s3://{bucket}/ok.txt", endpoint_url=s3_server)
    loc.write_bytes(b"authorised")
    assert loc.read_bytes() == b"authorised"


@pytest.mark.parametrize("which", ["wrong-secret", "unknown-key"])
def test_s3_rejected_credentials(which, moto_auth, s3_server, monkeypatch):
    bucket, key_id, secret = moto_auth
    bad_secret = "Wr0ng-" + secret[6:]
    if which == "wrong-secret":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA" + "X" * 16)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad_secret)
    loc = resolve(f"s3://{bucket}/denied.txt", endpoint_url=s3_server)
    for op in (lambda: loc.write_bytes(b"x"), loc.read_bytes):
        with pytest.raises(StorageError) as info:
            op()
        msg = str(info.value)
        assert msg.startswith(f"access denied to s3://{bucket}/denied.txt"), msg
        assert "AWS_SECRET_ACCESS_KEY" in msg  # tells the user what to check ...
        assert bad_secret not in msg and secret not in msg  # ... without the value


# --- credentials never travel ----------------------------------------------------------------
PLANTED = {
    "AWS_ACCESS_KEY_ID": "AKIAPLANTEDQ7X2LEPTON",
    "AWS_SECRET_ACCESS_KEY": "planted/Secret+Value+9f3e7c1a2b",
    "AWS_SESSION_TOKEN": "planted-session-token-5d8e",
}


def _pickled(*objs) -> list[bytes]:
    import pickle

    import ray.cloudpickle

    return [dump(o) for o in objs for dump in (pickle.dumps, ray.cloudpickle.dumps)]


def test_pickled_s3_location_and_filesystem_carry_no_credentials(s3_server, s3_bucket, monkeypatch):
    """Ray pickles the filesystem into every Ray Data / Ray Train task: no key may ride along."""
    import pickle

    for name, value in PLANTED.items():
        monkeypatch.setenv(name, value)
    loc = resolve(f"s3://{s3_bucket}/creds/obj.bin", endpoint_url=s3_server)
    loc.write_bytes(b"written with the planted key")  # the SDK has resolved the credentials
    for blob in _pickled(loc, loc.fs, loc.parent):
        for value in PLANTED.values():
            assert value.encode() not in blob
    # Unpickled, it finds the credentials again where it runs (here: the environment).
    restored = pickle.loads(pickle.dumps(loc))
    assert restored.is_s3 and restored.uri == loc.uri
    assert restored.read_bytes() == b"written with the planted key"
    restored.parent.join("second.bin").write_bytes(b"and again")
    assert loc.parent.join("second.bin").read_bytes() == b"and again"


@pytest.mark.ray
def test_a_ray_task_reads_and_writes_s3_with_the_credentials_of_its_own_process(
    ray_session, s3_server, s3_bucket
):
    import ray

    loc = resolve(f"s3://{s3_bucket}/task", endpoint_url=s3_server)
    loc.join("in.txt").write_bytes(b"from the driver")

    @ray.remote(num_cpus=0)
    def copy(where: Location) -> int:
        data = where.join("in.txt").read_bytes()
        where.join("out.txt").write_bytes(data + b", through a task")
        return os.getpid()

    import ray.cloudpickle

    for blob in [*_pickled(loc), ray.cloudpickle.dumps(copy)]:
        assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in blob
        assert os.environ["AWS_ACCESS_KEY_ID"].encode() not in blob
    assert ray.get(copy.remote(loc)) != os.getpid()
    assert loc.join("out.txt").read_bytes() == b"from the driver, through a task"
