"""What an operator installs: man pages, rc.d script, systemd unit, and a wheel that works."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from scam_back import cli
from scam_back.config import KEYS

ROOT = Path(__file__).resolve().parent.parent


def test_scam_conf_man_page_documents_every_key():
    page = (ROOT / "man" / "scam.conf.5").read_text()
    missing = [name for name, *_ in KEYS.values() if not re.search(rf"\b{name}:", page)]
    assert missing == []


def test_scam_back_man_page_documents_every_flag():
    page = (ROOT / "man" / "scam-back.8").read_text()
    flags = [a.option_strings[0] for a in cli._parser()._actions]
    missing = [flag for flag in flags if f"\\{flag}" not in page]
    assert missing == []


def test_readme_documents_every_key():
    readme = (ROOT / "README").read_text()
    assert [name for name, *_ in KEYS.values() if f"| {name} |" not in readme] == []


def test_shipped_config_passes_the_check(tmp_path):
    from .conftest import run_cli
    result = run_cli("-t", "-f", str(ROOT / "etc" / "scam.conf"))
    assert result.returncode == 0, result.stderr


def test_rc_script_is_valid_sh():
    subprocess.run(["sh", "-n", str(ROOT / "rc.d" / "scam_back")], check=True, timeout=10)


STUB_RC_SUBR = """
load_rc_config() { :; }
run_rc_command() {
    command="$TEST_COMMAND"
    scam_back_precmd; echo "precmd=$?"
    echo "name=$name"; echo "rcvar=$rcvar"; echo "pidfile=$pidfile"
    echo "required_files=$required_files"; echo "command_args=$command_args"
    echo "sig_stop=$sig_stop"
}
"""


def test_rc_script_with_a_stub_rc_subr_creates_the_socket_folder_for_the_user(tmp_path):
    stub = tmp_path / "rc.subr"
    stub.write_text(STUB_RC_SUBR)
    script = tmp_path / "scam_back"
    script.write_text((ROOT / "rc.d" / "scam_back").read_text().replace(". /etc/rc.subr",
                                                                          f". {stub}"))
    checker = tmp_path / "fake-scam-back"
    checker.write_text("#!/bin/sh\necho \"checked $*\"\n")
    checker.chmod(0o755)
    user = "nobody" if os.geteuid() == 0 else os.environ.get("USER", "root")
    env = dict(os.environ, TEST_COMMAND=str(checker), scam_back_user=user,
               scam_back_socket=f"unix:{tmp_path}/sock/scam-back.sock",
               scam_back_pidfile=f"{tmp_path}/run/scam-back.pid",
               scam_back_config=str(ROOT / "etc" / "scam.conf"))
    result = subprocess.run(["sh", str(script), "start"], env=env, capture_output=True, text=True,
                            timeout=20)
    out = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert out["precmd"] == "0", result.stderr
    assert out["name"] == "scam_back" and out["rcvar"] == "scam_back_enable"
    assert out["pidfile"] == f"{tmp_path}/run/scam-back.pid"
    assert out["required_files"] == str(ROOT / "etc" / "scam.conf")
    assert f"-p unix:{tmp_path}/sock/scam-back.sock -u {user}" in out["command_args"]
    assert out["command_args"].endswith("-D") and out["sig_stop"] == "TERM"
    assert "checked -t -f" in result.stdout
    if os.geteuid() == 0:
        import pwd
        assert (tmp_path / "sock").stat().st_uid == pwd.getpwnam("nobody").pw_uid


def test_systemd_unit_runs_in_the_foreground_and_drops_privileges():
    unit = (ROOT / "etc" / "scam-back.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "simple"
    start = settings["ExecStart"].split()
    assert "-D" not in start and "-u" in start
    assert settings["PIDFile"] == start[start.index("-P") + 1]
    assert "RestartPreventExitStatus" in settings


def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path):
    """The built wheel carries the command and the man pages; its -h runs."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(ROOT)], check=True, timeout=300, capture_output=True)
    wheel = next(wheels.glob("scam_back-*.whl"))
    target = tmp_path / "venv"
    venv.create(target, with_pip=False, symlinks=True)
    target_site = Path(sysconfig.get_path("purelib", vars={"base": str(target),
                                                             "platbase": str(target)}))
    # Dependencies (pymilter, dnspython) come from this venv, not from the network.
    (target_site / "deps.pth").write_text(sysconfig.get_path("platlib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(target / "bin" / "python"),
                    "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300,
                   capture_output=True)
    result = subprocess.run([str(target / "bin" / "scam-back"), "-h"], capture_output=True,
                            text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 0 and "usage: scam-back" in result.stdout
    where = subprocess.run([str(target / "bin" / "python"), "-c",
                            "import scam_back; print(scam_back.__file__)"],
                           capture_output=True, text=True, timeout=30, cwd=tmp_path).stdout
    assert where.startswith(str(target))
    assert (target / "share" / "man" / "man8" / "scam-back.8").exists()
    assert (target / "share" / "man" / "man5" / "scam.conf.5").exists()
    shutil.rmtree(target)
