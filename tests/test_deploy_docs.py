"""The deployment docs and example configs say what works: the Kubernetes sidecar manifest parses
and shares the socket directory and /dev/shm with a preStop drain inside the grace period, the
systemd unit has what the daemon relies on, and every ``ckptd ...`` command quoted in the docs and
examples parses with the real CLI (its verb's ``--help`` exits 0, its flags exist, its values read).
"""

from __future__ import annotations

import argparse
import configparser
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ckptd.cli import build_parser, keep_local_retention, read_upload_limit

REPO = Path(__file__).resolve().parent.parent
DOCS = ["docs/slurm.md", "docs/kubernetes.md", "docs/systemd.md"]
SCRIPTS = ["deploy/slurm/ckptd.sbatch", "deploy/slurm/epilog.sh"]
UNITS = ["systemd/ckptd.service", "systemd/train@.service.example"]
MANIFEST = "deploy/kubernetes/sidecar.yaml"
_VAR = re.compile(r"\$\{[^}]*\}|\$\([^)]*\)|\$[A-Za-z_][A-Za-z0-9_]*|%[a-zA-Z]")


def _verbs() -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


VERBS = _verbs()


def commands_in(text: str) -> list[list[str]]:
    """Every ``ckptd VERB ...`` in shell-like text, as argv after ``ckptd``. Variables become
    ``1`` (a valid path, number or name alike); a shell operator ends the command."""
    text = _VAR.sub("1", text.replace("\\\n", " "))
    out = []
    for line in text.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.commenters = ""
        lex.whitespace_split = True
        try:
            tokens = list(lex)
        except ValueError:  # an unbalanced quote: a prose line, not a command
            continue
        for i, tok in enumerate(tokens[:-1]):
            if os.path.basename(tok) == "ckptd" and tokens[i + 1] in VERBS:
                argv = []
                for t in tokens[i + 1 :]:
                    if t and set(t) <= set("();<>|&"):
                        break
                    if t.startswith("#"):
                        break
                    argv.append(t)
                out.append(argv)
    return out


def doc_commands(path: str, *, spans: bool = True) -> list[list[str]]:
    """Commands in a markdown file's fenced code blocks and (with ``spans``) inline code."""
    text = (REPO / path).read_text()
    chunks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    if spans:
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        chunks += re.findall(r"`([^`\n]+)`", prose)
    return [c for chunk in chunks for c in commands_in(chunk)]


def check_command(argv: list[str]) -> argparse.Namespace:
    """Parse with the real parser; for ``serve``, read the policy values as ``serve`` does."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"`ckptd {shlex.join(argv)}` does not parse (exit {e.code})") from None
    if argv[0] == "serve":
        keep_local_retention(args)
        read_upload_limit(args.upload_limit)
    return args


def _all_commands() -> list[tuple[str, list[str]]]:
    found = [(p, c) for p in DOCS for c in doc_commands(p)]
    # the README's usage table writes placeholders ([--timeout S]); its code blocks are real
    found += [("README.md", c) for c in doc_commands("README.md", spans=False)]
    found += [(p, c) for p in SCRIPTS for c in commands_in((REPO / p).read_text())]
    for unit in UNITS:
        for key, value in _unit_items(unit):
            if key.startswith("Exec"):
                found += [(unit, c) for c in commands_in(value)]
    found += [(MANIFEST, c) for c in _manifest_commands()]
    return found


def test_the_docs_and_examples_quote_commands() -> None:
    files = {p for p, _ in _all_commands()}
    # each of these quotes at least one command: an extractor that finds nothing proves nothing
    assert files >= {*DOCS, *SCRIPTS, MANIFEST, "systemd/ckptd.service"}, files
    verbs = {c[0] for _, c in _all_commands()}
    assert {"serve", "drain", "status", "exec"} <= verbs, verbs


def test_the_extractor_catches_a_bad_flag() -> None:
    (argv,) = commands_in('srun --overlap ckptd drain --socket "$S" --timeot 10 && echo done')
    assert argv == ["drain", "--socket", "1", "--timeot", "10"]
    with pytest.raises(AssertionError, match="does not parse"):
        check_command(argv)


def test_each_verb_used_has_help() -> None:
    for verb in sorted({c[0] for _, c in _all_commands()}):
        r = subprocess.run([sys.executable, "-m", "ckptd", verb, "--help"], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0 and "usage: ckptd " + verb in r.stdout, (verb, r.stderr)


# ---- Kubernetes: deploy/kubernetes/sidecar.yaml ----------------------------------------------------


def _pod() -> dict[str, Any]:
    doc = yaml.safe_load((REPO / MANIFEST).read_text())
    assert doc["kind"] in ("Job", "Pod", "Deployment", "StatefulSet")
    return doc["spec"]["template"]["spec"] if doc["kind"] != "Pod" else doc["spec"]


def _containers(pod: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    every = pod.get("initContainers", []) + pod["containers"]
    (sidecar,) = [c for c in every if c["command"][:2] == ["ckptd", "serve"]]
    (trainer,) = [c for c in pod["containers"] if c is not sidecar]
    return sidecar, trainer


def _manifest_commands() -> list[list[str]]:
    sidecar, _ = _containers(_pod())
    cmds = [sidecar["command"], sidecar["lifecycle"]["preStop"]["exec"]["command"]]
    if "startupProbe" in sidecar:
        cmds.append(sidecar["startupProbe"]["exec"]["command"])
    return [c[1:] for c in cmds if c[0] == "ckptd"]


def _mounts(c: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}


def test_sidecar_shares_the_socket_directory_and_shared_memory() -> None:
    pod = _pod()
    volumes = {v["name"]: v for v in pod["volumes"]}
    sidecar, trainer = _containers(pod)
    if sidecar in pod.get("initContainers", []):  # a native sidecar must keep running
        assert sidecar.get("restartPolicy") == "Always"
    serve = check_command(sidecar["command"][1:])
    sock_dir = os.path.dirname(serve.socket)
    shared = set(_mounts(sidecar)) & set(_mounts(trainer))
    shm = [n for n in shared if _mounts(trainer)[n] == "/dev/shm"]
    assert len(shm) == 1 and _mounts(sidecar)[shm[0]] == "/dev/shm"
    assert volumes[shm[0]]["emptyDir"]["medium"] == "Memory"
    sock = [n for n in shared if sock_dir.startswith(_mounts(sidecar)[n])]
    assert len(sock) == 1 and "emptyDir" in volumes[sock[0]], (sock, sock_dir)
    assert _mounts(sidecar)[sock[0]] == _mounts(trainer)[sock[0]]
    # ckptd refuses a socket directory others may write: an emptyDir is 0777, so the socket
    # lives one directory below the mount, which the daemon creates owner-only
    assert sock_dir != _mounts(sidecar)[sock[0]].rstrip("/")
    env = {e["name"]: e.get("value") for e in trainer.get("env", [])}
    assert env["CKPTD_SOCKET"] == serve.socket
    ctx = pod.get("securityContext", {})
    assert "runAsUser" in ctx or (
        sidecar.get("securityContext", {}).get("runAsUser")
        == trainer.get("securityContext", {}).get("runAsUser")
        is not None
    ), "the trainer and the daemon must run as one user"


def test_sidecar_drains_in_prestop_within_the_grace_period() -> None:
    pod = _pod()
    sidecar, _ = _containers(pod)
    serve = check_command(sidecar["command"][1:])
    pre = sidecar["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[:2] == ["ckptd", "drain"]
    drain = check_command(pre[1:])
    assert drain.socket == serve.socket and drain.timeout is not None
    # preStop's drain, then SIGTERM's drain, both inside the pod's grace period
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > drain.timeout + serve.drain_timeout, (grace, drain.timeout, serve.drain_timeout)


# ---- systemd -------------------------------------------------------------------------------------------


def _unit_items(path: str) -> list[tuple[str, str]]:
    parser = _unit(path)
    return [(k, v) for s in parser.sections() for k, v in parser.items(s)]


def _unit(path: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"),
                                       inline_comment_prefixes=None)  # fmt: skip
    parser.optionxform = str  # type: ignore[assignment,method-assign] - systemd keys are case-sensitive
    parser.read_string((REPO / path).read_text())
    return parser


def test_the_systemd_unit_has_what_the_daemon_relies_on() -> None:
    unit = _unit("systemd/ckptd.service")
    assert set(unit.sections()) >= {"Unit", "Service", "Install"}
    assert "network-online.target" in unit["Unit"]["After"].split()
    assert "network-online.target" in unit["Unit"]["Wants"].split()
    svc = unit["Service"]
    assert svc["Type"] == "notify" and svc["KillSignal"] == "SIGTERM"
    (serve,) = commands_in(svc["ExecStart"])
    args = check_command(serve)
    assert serve[0] == "serve"
    # the stop timeout covers the daemon's own drain bound (SIGTERM drains; no ExecStop needed)
    assert float(svc["TimeoutStopSec"]) > args.drain_timeout
    assert "ExecStop" not in svc or commands_in(svc["ExecStop"])
    assert int(svc["WatchdogSec"]) > 0 and svc["Restart"] == "on-failure"
    assert "AF_UNIX" in svc["RestrictAddressFamilies"].split()
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_the_training_unit_stops_before_the_daemon() -> None:
    unit = _unit("systemd/train@.service.example")
    assert "ckptd.service" in unit["Unit"]["After"].split()
    (argv,) = commands_in(unit["Service"]["ExecStart"])
    assert argv[0] == "exec"
    check_command(argv)


def test_the_slurm_script_drains_after_training_and_before_stopping_the_daemons() -> None:
    text = (REPO / "deploy/slurm/ckptd.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "deploy/slurm/ckptd.sbatch")]).returncode == 0
    verbs = [c[0] for c in commands_in(text)]
    assert verbs == ["serve", "status", "drain"], verbs
    sbatch = dict(re.findall(r"^#SBATCH --(\w[\w-]*)=(\S+)", text, flags=re.M))
    lead = int(sbatch["signal"].rsplit("@", 1)[1])
    drain = int(re.search(r"^DRAIN=(\d+)", text, flags=re.M).group(1))  # type: ignore[union-attr]
    assert drain < lead, "the drain must end before the time limit"
    assert text.index("ckptd drain") < text.index('kill -TERM "$DAEMONS"  #')
    assert "export CKPTD_SOCKET=" in text


# Collected when the module is read: defined after every helper it uses.
@pytest.mark.parametrize(("where", "argv"), _all_commands(), ids=lambda x: str(x)[:60])
def test_every_quoted_command_parses(where: str, argv: list[str]) -> None:
    check_command(argv)
