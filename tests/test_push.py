"""`dllmq push` against a fake Hub on 127.0.0.1: what arrives, the model card, dry runs, bad inputs.

The fake answers the calls huggingface_hub makes for create_repo + create_commit: repo creation,
repo info, branch creation, README YAML validation, preupload (safetensors as LFS, the rest as
regular base64 files in the commit), the LFS batch API with a basic PUT upload, and the NDJSON commit.
"""

import base64
import hashlib
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cli_helpers import run_cli

TOKEN = "hf_dummyTOKEN0123456789abcdef"
REPO = "me/tiny-w4"


class FakeHub:
    def __init__(self):
        self.reset()

    def reset(self):
        self.requests = []  # (method, path)
        self.creates, self.branches, self.commits, self.yaml = [], [], [], []
        self.lfs = {}  # oid -> bytes PUT to the upload URL
        self.auth = set()
        self.existing_public = False  # pretend the repo already exists and is public
        self.fail = {}  # path regex -> HTTP status


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, obj=None):
            body = json.dumps(obj if obj is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _route(self, method: str):
            path = self.path.split("?")[0]
            body = self._body()
            hub.requests.append((method, path))
            if self.headers.get("Authorization"):
                hub.auth.add(self.headers["Authorization"])
            for pattern, status in hub.fail.items():
                if re.fullmatch(pattern, path):
                    return self._send(status, {"error": f"fake hub says {status}"})
            base = f"http://127.0.0.1:{self.server.server_port}"
            if method == "POST" and path == "/api/repos/create":
                payload = json.loads(body)
                hub.creates.append(payload)
                url = f"{base}/{payload['organization']}/{payload['name']}"
                if hub.existing_public:
                    return self._send(409, {"error": "You already created this model repo", "url": url})
                return self._send(200, {"url": url})
            if method == "GET" and (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)", path)):
                private = not hub.existing_public and any(c.get("visibility") == "private" for c in hub.creates)
                return self._send(200, {"id": m[1], "private": private, "sha": "0" * 40})
            if method == "POST" and path == "/api/validate-yaml":
                hub.yaml.append(json.loads(body)["content"])
                return self._send(200, {"errors": [], "warnings": []})
            if method == "POST" and (m := re.fullmatch(r"/api/models/[^/]+/[^/]+/branch/(.+)", path)):
                hub.branches.append(m[1])
                return self._send(200, {})
            if method == "POST" and re.fullmatch(r"/api/models/[^/]+/[^/]+/preupload/.+", path):
                files = json.loads(body)["files"]
                return self._send(200, {"files": [
                    {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                     "shouldIgnore": False, "oid": None} for f in files]})
            if method == "POST" and re.fullmatch(r"/[^/]+/[^/]+\.git/info/lfs/objects/batch", path):
                objects = json.loads(body)["objects"]
                return self._send(200, {"transfer": "basic", "objects": [
                    {"oid": o["oid"], "size": o["size"],
                     "actions": {"upload": {"href": f"{base}/lfs-upload/{o['oid']}"}}} for o in objects]})
            if method == "PUT" and (m := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)):
                hub.lfs[m[1]] = body
                return self._send(200, {})
            if method == "POST" and (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path)):
                lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                hub.commits.append({"repo": m[1], "revision": m[2], "lines": lines})
                return self._send(200, {"commitUrl": f"{base}/{m[1]}/commit/{'a' * 40}", "commitOid": "a" * 40,
                                        "pullRequestUrl": None})
            return self._send(404, {"error": f"fake hub: no route for {method} {path}"})

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

    return Handler


@pytest.fixture(scope="module")
def fake_hub():
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_port}"
    yield hub
    server.shutdown()
    server.server_close()


@pytest.fixture
def hub(fake_hub, monkeypatch, tmp_path):
    """Point huggingface_hub at the fake, online, without Xet (which needs its own storage service)."""
    import huggingface_hub.constants as c

    fake_hub.reset()
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setattr(c, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # never the developer's login
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return fake_hub


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny RTN W4 checkpoint made with the CLI (small vocab and one block: seconds, not minutes)."""
    from dllmq.cli.main import main
    from dllmq.models.tiny import write_tiny_llada

    root = tmp_path_factory.mktemp("push")
    src = write_tiny_llada(root / "tiny-llada", seed=0, embedding_size=512, vocab_size=512, n_layers=1)
    out = root / "tiny-w4"
    import sys

    old, sys.argv = sys.argv, ["dllmq", "quantize", str(src), "--method", "rtn", "--group-size", "32",
                               "--out", str(out), "--json"]
    try:
        main()
    finally:
        sys.argv = old
    # as if quantized from the Hub, so the card can name its base model
    mf = out / "dllmq_manifest.json"
    manifest = json.loads(mf.read_text())
    manifest["base_model"] = "GSAI-ML/LLaDA-8B-Instruct"
    mf.write_text(json.dumps(manifest, indent=2))
    return out


def _committed(hub: FakeHub) -> dict[str, bytes]:
    """path -> bytes of everything the single commit added (regular files decoded, LFS files from the PUTs)."""
    assert len(hub.commits) == 1
    files = {}
    for line in hub.commits[0]["lines"]:
        v = line["value"]
        if line["key"] == "file":
            files[v["path"]] = base64.b64decode(v["content"])
        elif line["key"] == "lfsFile":
            files[v["path"]] = hub.lfs[v["oid"]]
            assert hashlib.sha256(files[v["path"]]).hexdigest() == v["oid"]
    return files


def test_push_uploads_checkpoint_and_card(ckpt, hub, tmp_path, capsys):
    folder = tmp_path / "ck"
    shutil.copytree(ckpt, folder)
    (folder / "notes.txt").write_text("private notes: not part of the checkpoint")
    (folder / "README.md").write_text("my own readme")
    results = {"models": [
        {"label": "full precision", "model": "GSAI-ML/LLaDA-8B-Instruct",
         "tasks": {"tiny-math": {"task": "tiny-math", "metric": "exact_match", "value": 0.5, "stderr": 0.1, "n": 10}}},
        {"label": "quantized", "model": str(folder),
         "tasks": {"tiny-math": {"task": "tiny-math", "metric": "exact_match", "value": 0.4, "stderr": 0.1, "n": 10}}}],
        "config": {"tasks": ["tiny-math"], "limit": 10}}
    (folder / "results.json").write_text(json.dumps(results))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    code, out, err = run_cli(["push", folder, REPO, "--private", "--revision", "w4-test",
                              "--commit-message", "first upload", "--json"], capsys)
    assert code == 0, err
    assert TOKEN not in out and TOKEN not in err
    summary = json.loads(out)
    assert summary["repo_id"] == REPO and summary["private"] is True and summary["dry_run"] is False
    assert "notes.txt" in summary["not_uploaded"]

    assert hub.creates == [{"name": "tiny-w4", "organization": "me", "visibility": "private"}]
    assert hub.branches == ["w4-test"]
    assert hub.auth == {f"Bearer {TOKEN}"}  # the token reached the Hub, and only the Hub
    assert hub.commits[0]["revision"] == "w4-test" and hub.commits[0]["lines"][0]["value"]["summary"] == "first upload"
    files = _committed(hub)
    manifest = json.loads((folder / "dllmq_manifest.json").read_text())
    assert set(files) == set(manifest["files"]) | {"dllmq_manifest.json", "README.md", "results.json"}
    for name in manifest["files"]:
        assert files[name] == (folder / name).read_bytes(), name
    lfs = {line["value"]["path"] for line in hub.commits[0]["lines"] if line["key"] == "lfsFile"}
    assert lfs == {n for n in files if n.endswith(".safetensors")} and lfs  # shards went through LFS

    card = files["README.md"].decode()
    assert hub.yaml == [card]
    header = card.split("---\n")[1]
    for field in ("base_model: GSAI-ML/LLaDA-8B-Instruct", "base_model_relation: quantized", "library_name: dllmq",
                  "pipeline_tag: text-generation", "- dllmq", "- diffusion", "- quantized", "- 4-bit", "- w4a16",
                  "- rtn", "- llada"):
        assert field in header, field
    assert "| group size | 32 |" in card and "| weight bits | 4 |" in card
    assert "| tiny-math | exact_match | 10 | 50.0 ± 10.0 | 40.0 ± 10.0 | -10.0 |" in card
    assert f'dllmq generate {REPO} "' in card and f'dllmq.load("{REPO}"' in card
    # the user's folder is untouched
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_private_refused_for_existing_public_repo(ckpt, hub, capsys):
    hub.existing_public = True
    code, out, err = run_cli(["push", ckpt, REPO, "--private"], capsys)
    assert code == 2 and "already exists and is public" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not hub.commits


def test_dry_run_uploads_nothing(ckpt, hub, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HF_TOKEN")  # a dry run needs no token
    code, out, err = run_cli(["push", ckpt, REPO, "--dry-run"], capsys)
    assert code == 0, err
    assert hub.requests == []
    for name in ("config.json", "dllmq_manifest.json", "README.md", "model.safetensors.index.json"):
        assert name in out
    assert "library_name: dllmq" in out and REPO in out and "revision main" in out

    # NLL-style results from outside the folder: uploaded as eval_results.json, quoted on the card
    res = tmp_path / "nll.json"
    res.write_text(json.dumps({"models": [{"label": "full precision", "model": "GSAI-ML/LLaDA-8B-Instruct",
                                           "nll": 5.5, "disk_bytes": 2048},
                                          {"label": "quantized", "model": str(ckpt), "nll": 5.75, "agreement": 0.875}],
                               "config": {"seq_len": 128}}))
    code, out, err = run_cli(["push", ckpt, REPO, "--dry-run", "--json", "--revision", "dev", "--results", res], capsys)
    assert code == 0, err
    plan = json.loads(out)
    assert plan["dry_run"] is True and plan["revision"] == "dev" and plan["token_found"] is False
    assert {f["path"] for f in plan["files"]} >= {"config.json", "README.md", "dllmq_manifest.json",
                                                   "eval_results.json"}
    assert plan["card_metadata"]["base_model_relation"] == "quantized"
    assert "| quantized | 5.7500 | 0.8750 | - |" in plan["card"]
    assert hub.requests == []


def _tampered(ckpt, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(ckpt, bad)
    shard = sorted(bad.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    return bad


def _partial(ckpt, tmp_path):
    p = tmp_path / ".tiny-w4.partial"
    shutil.copytree(ckpt, p)
    return p


def _not_checkpoint(ckpt, tmp_path):
    p = tmp_path / "plain"
    p.mkdir()
    (p / "weights.txt").write_text("x")
    return p


@pytest.mark.parametrize("make,extra,message", [
    (lambda c, t: t / "nope", [], "not found"),
    (_tampered, [], "sha256"),
    (_partial, [], "unfinished"),
    (_not_checkpoint, [], "not a dllmq checkpoint"),
    (lambda c, t: c, ["--results", "missing.json"], "--results"),
])
def test_bad_checkpoint_one_line_exit_2(make, extra, message, ckpt, hub, tmp_path, capsys):
    code, out, err = run_cli(["push", make(ckpt, tmp_path), REPO, *extra], capsys)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert hub.requests == []


def test_bad_repo_id(ckpt, hub, capsys):
    code, _, err = run_cli(["push", ckpt, "no-owner", "--dry-run"], capsys)
    assert code == 2 and "owner/name" in err and len(err.strip().splitlines()) == 1


def test_no_token(ckpt, hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    code, out, err = run_cli(["push", ckpt, REPO], capsys)
    assert code == 2 and "hf auth login" in err and "HF_TOKEN" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert hub.requests == []


@pytest.mark.parametrize("status,message", [(401, "rejected the token"), (403, "no write access")])
def test_hub_http_errors_one_line(status, message, ckpt, hub, capsys):
    hub.fail = {r"/api/models/.+/preupload/.+": status}
    code, out, err = run_cli(["push", ckpt, REPO], capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert TOKEN not in out + err
    assert not hub.commits


# ---------------------------------------------------------------------------------------------- issue 16
def _task_results(fp: str, quantized: str) -> dict:
    """The shape `dllmq eval MODEL --tasks ... --output` writes."""
    return {"models": [
        {"label": "full precision", "model": fp,
         "tasks": {"tiny-math": {"task": "tiny-math", "metric": "exact_match", "value": 0.5, "stderr": 0.1, "n": 10}}},
        {"label": "quantized", "model": quantized,
         "tasks": {"tiny-math": {"task": "tiny-math", "metric": "exact_match", "value": 0.4, "stderr": 0.1, "n": 10}}}],
        "config": {"tasks": ["tiny-math"], "limit": 10}, "command": "dllmq eval ..."}


def _variant(ckpt, tmp_path, name, **weights):
    """A copy of the checkpoint whose quantization_config differs (or not, without weights=...)."""
    other = tmp_path / name
    shutil.copytree(ckpt, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["quantization_config"]["weights"].update(weights)
    (other / "config.json").write_text(json.dumps(cfg))
    return other


def test_results_of_another_checkpoint_refused(ckpt, hub, tmp_path, capsys):
    other = _variant(ckpt, tmp_path, "tiny-w4-g64", group_size=64)
    res = tmp_path / "other.json"
    res.write_text(json.dumps(_task_results("GSAI-ML/LLaDA-8B-Instruct", str(other))))
    code, out, err = run_cli(["push", ckpt, REPO, "--dry-run", "--results", res], capsys)
    assert code == 2 and "does not belong to this checkpoint" in err and "group_size" in err and "--force" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and hub.requests == []

    # the same results, forced: accepted, and the plan says they were not matched
    code, out, err = run_cli(["push", ckpt, REPO, "--dry-run", "--json", "--force", "--results", res], capsys)
    assert code == 0, err
    assert json.loads(out)["results_matched"] is False

    # a copy with the same settings and base model is the same checkpoint
    same = _variant(ckpt, tmp_path, "copy")
    res.write_text(json.dumps(_task_results("GSAI-ML/LLaDA-8B-Instruct", str(same))))
    code, out, err = run_cli(["push", ckpt, REPO, "--dry-run", "--json", "--results", res], capsys)
    assert code == 0, err
    assert json.loads(out)["results_matched"] is True


@pytest.mark.parametrize("doc,message", [
    (lambda c: _task_results("GSAI-ML/LLaDA-8B-Instruct", "someone/else-w4"), "none of its models"),
    (lambda c: _task_results("Dream-org/Dream-v0-Instruct-7B", str(c)), "full-precision record is Dream-org"),
    (lambda c: {"gsm8k": {"exact_match": 0.5}}, "no per-model records"),
])
def test_unmatched_results_refused(doc, message, ckpt, hub, tmp_path, capsys):
    res = tmp_path / "r.json"
    res.write_text(json.dumps(doc(ckpt)))
    code, out, err = run_cli(["push", ckpt, REPO, "--results", res], capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and hub.requests == []


def test_dry_run_prints_whole_card_with_model_index(ckpt, hub, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HF_TOKEN")
    res = tmp_path / "w4.json"
    res.write_text(json.dumps(_task_results("GSAI-ML/LLaDA-8B-Instruct", str(ckpt))))
    code, out, err = run_cli(["push", ckpt, REPO, "--dry-run", "--results", res], capsys)
    assert code == 0, err
    assert f"# {REPO}\n" in out  # the title names the owner
    for section in ("## Quantization", "## Evaluation", "## Usage", "## Files"):
        assert section in out, section
    assert "pip install -e ." in out and "pip install dllmq" not in out  # as README's install section says

    code, out, err = run_cli(["push", ckpt, REPO, "--dry-run", "--json", "--results", res], capsys)
    meta = json.loads(out)["card_metadata"]
    (entry,) = meta["model-index"]
    assert entry["name"] == REPO
    (result,) = entry["results"]
    assert result["task"]["type"] == "text-generation" and result["dataset"]["type"] == "tiny-math"
    assert result["metrics"] == [{"type": "exact_match", "name": "exact_match", "value": 0.4}]  # the quantized one


def test_card_shows_patterns_unescaped_and_cgq_only_when_used(ckpt):
    import dataclasses

    from dllmq.hub.card import build_card
    from dllmq.hub.push import validate_checkpoint

    c = validate_checkpoint(ckpt)
    q = dataclasses.replace(c.qcfg, method="gptq", ignore=[r"model\.transformer\.ff_out", r".*(q|k)_proj"],
                            method_args={"damp": 0.01, "act_order": True, "cgq": False, "cgq_masked": 1.0,
                                         "cgq_visible": 0.5})
    card = str(build_card(dataclasses.replace(c, qcfg=q), REPO))
    assert "`model.transformer.ff_out`" in card and "model\\." not in card
    assert "```text\n.*(q|k)_proj\n```" in card and "\\|" not in card
    assert "CGQ masked" not in card and "CGQ visible" not in card and "GPTQ dampening" in card

    q = dataclasses.replace(q, method_args={**q.method_args, "cgq": True})
    card = str(build_card(dataclasses.replace(c, qcfg=q), REPO))
    assert "| CGQ masked-token weight | 1 |" in card and "| CGQ visible-token weight | 0.5 |" in card
