"""`medblindtuner consortium create | keys | bundle | refresh` against a real service (insecure
test ring): three hospital processes make the joint key through the service and save their
own state; the cloud operator's `bundle` writes a verified joint public bundle from the
store; later, `refresh` processes restore each saved share and answer a joint refresh that
this process (the cloud) asks through the store; the restored shares decrypt its result.
"""

from __future__ import annotations

import json
import stat
import subprocess

import numpy as np
import pytest
from helpers_consortium import LENGTH, refresh_plan
from helpers_consortium_cli import consortium_cli
from helpers_consortium_cli import finished as finished_processes
from helpers_service import ServiceProcess
from typer.testing import CliRunner

from medblindtuner.cli.main import app
from medblindtuner.consortium.remote import RelayedMember
from medblindtuner.consortium.roles import PARTY_DIR, consortium_params
from medblindtuner.he.joint_refresh import JointCloudRefresher
from medblindtuner.he.keys import verify_public_bundle
from medblindtuner.he.refresh import max_refresh_level
from medblindtuner.he.threshold import RoundError, ThresholdParty, joint_context
from medblindtuner.service.consortia import ConsortiumRelay
from medblindtuner.service.limits import ServiceConfig
from medblindtuner.service.store import Store

N = 3
X = np.linspace(-0.5, 0.5, LENGTH)
TIMEOUT = "240"


def cli(*args: str) -> subprocess.Popen:
    return consortium_cli(*args, timeout=TIMEOUT)


def finished(processes: list[subprocess.Popen]) -> list[str]:
    return finished_processes(processes, TIMEOUT)


@pytest.fixture(scope="module")
def formed(tmp_path_factory):
    root = tmp_path_factory.mktemp("roles")
    plan = refresh_plan()
    (root / "plan.json").write_text(json.dumps(plan.to_dict()))
    with ServiceProcess(root / "cloud") as server:
        made = CliRunner().invoke(app, ["consortium", "create", "--service", server.url,
                                        "--hospitals", str(N), "--out", str(root / "members")])
        assert made.exit_code == 0, made.output
        cid = json.loads((root / "members" / "hospital-0.json").read_text())["consortium_id"]
        common = ["--plan", str(root / "plan.json")]
        hospitals = [cli("keys", "--member", str(root / "members" / f"hospital-{i}.json"),
                         "--state", str(root / f"state-{i}"), *common) for i in range(N)]
        bundler = cli("bundle", "--data-dir", str(server.data_dir), "--consortium", cid,
                      "--out", str(root / "bundle"), *common)
        outputs = finished([*hospitals, bundler])
        yield root, server, cid, plan, outputs


def test_keys_and_bundle_roles_make_one_verified_joint_key(formed):
    root, _server, _cid, _plan, outputs = formed
    fingerprints = [[line.split()[-1] for line in out.splitlines() if "roster hospital" in line]
                    for out in outputs[:N]]
    assert len(fingerprints[0]) == N and all(f == fingerprints[0] for f in fingerprints)
    tags = {line.split()[-1] for out in outputs[:N] for line in out.splitlines()
            if "joint key" in line}
    assert len(tags) == 1
    manifest = verify_public_bundle(root / "bundle", allow_insecure=True)
    assert "secret_key.bin" not in manifest["files"]
    for i in range(N):
        assert stat.S_IMODE((root / "members" / f"hospital-{i}.json").stat().st_mode) == 0o600
        share = root / f"state-{i}" / PARTY_DIR / "secret_share.bin"
        assert stat.S_IMODE(share.stat().st_mode) == 0o600
        assert not (root / f"state-{i}" / "ceremony").exists()  # the share's copy is gone

    def keys_again(member: int, state: int):  # noqa: ANN202 - a click Result
        return CliRunner().invoke(app, ["consortium", "keys", "--member",
                                        str(root / "members" / f"hospital-{member}.json"),
                                        "--state", str(root / f"state-{state}"), "--plan",
                                        str(root / "plan.json"), "--insecure-test-params"])

    again = keys_again(0, 0)  # run again after it ended: reads back what it saved
    assert again.exit_code == 0 and tags.pop() in again.output, again.output
    foreign = keys_again(0, 1)  # another hospital's folder: refused
    assert foreign.exit_code == 2 and "is hospital 1" in foreign.output


def test_refresh_role_answers_from_the_saved_share(formed):
    root, server, cid, plan, _outputs = formed
    params = consortium_params(plan, insecure=True)
    context = joint_context(params)
    parties = [ThresholdParty.restore(root / f"state-{i}" / PARTY_DIR, context)
               for i in range(N)]
    with pytest.raises(RoundError, match="restored"):
        parties[1].relin_share(b"")
    hospitals = [cli("refresh", "--member", str(root / "members" / f"hospital-{i}.json"),
                     "--state", str(root / f"state-{i}"), "--plan", str(root / "plan.json"))
                 for i in range(N)]
    config = ServiceConfig(server.data_dir)
    relay = ConsortiumRelay(config, Store(config.resolved_db_url))
    public_key = parties[0].joint_public_key
    cloud = JointCloudRefresher(context, params, public_key,
                                [RelayedMember(relay, cid, i, 240) for i in range(N)],
                                plan.job_tag(params))
    plain = context.MakeCKKSPackedPlaintext(np.tile(X, params.slots // LENGTH), 1,
                                            max_refresh_level(params) - 1, None, params.slots)
    fresh = cloud.refresh(context.EvalMult(context.Encrypt(public_key, plain), 1.0), 0)
    assert all("answered 1 joint refreshes" in out for out in finished(hospitals))
    shares = [context.MultipartyDecryptLead([fresh], parties[0]._secret_key())[0]]
    shares += [context.MultipartyDecryptMain([fresh], p._secret_key())[0] for p in parties[1:]]
    decoded = context.MultipartyDecryptFusion(shares)
    decoded.SetLength(LENGTH)
    assert np.max(np.abs(np.asarray(decoded.GetRealPackedValue()) - X)) < 1e-4
    assert fresh.GetLevel() == 0


def test_a_refused_token_is_one_error_line(formed, tmp_path):
    """The service's refusal reaches a hospital's command as one `error:` line (exit 2), not a
    traceback."""
    root, *_ = formed
    member = json.loads((root / "members" / "hospital-1.json").read_text())
    member = {k: ("0" * len(v) if k == "token" else v) for k, v in member.items()}
    (tmp_path / "forged.json").write_text(json.dumps(member))
    out = CliRunner().invoke(app, ["consortium", "keys", "--member", str(tmp_path / "forged.json"),
                                   "--state", str(tmp_path / "state"), "--plan",
                                   str(root / "plan.json"), "--insecure-test-params",
                                   "--timeout", "20"])
    assert out.exit_code == 2, out.output
    assert "error:" in out.output and "HTTP 40" in out.output
    assert "Traceback" not in out.output
