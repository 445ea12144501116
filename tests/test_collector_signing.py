"""Webhook signatures as the providers compute them: SendGrid's ECDSA Signed Event Webhook and
Twilio's X-Twilio-Signature, checked against the providers' published test vectors, then over
real HTTP to a real `ledger serve` configured with `ledger sources signing`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import orjson
import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from collector_server import Server, add_source, cli_env
from conftest import TEST_MASTER_KEY
from ledger.collector.db import CollectorDB
from ledger.collector.signing import (
    SignatureRefused,
    WebhookSigning,
    load_sendgrid_key,
    twilio_signature,
    twilio_urls,
    verify_sendgrid,
    verify_twilio,
)
from ledger.collector.touch import event_id
from ledger.ledger import Ledger, LedgerError
from ledger.settings import Settings
from test_collector_webhooks import sendgrid_sample, twilio_callback

# SendGrid's published test vector (sendgrid-python, test/unit/test_eventwebhook.py): a real
# signature by SendGrid's documented scheme over this exact payload and timestamp.
SG_PUBLIC_KEY = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe"
    "62gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g=="
)
SG_OTHER_KEY = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqTxd43gyp8IOEto2LdIfjRQrIbsd4SXZkLW6jDutdhXSJCWHw8R"
    "Entlo7aNDthvj+y7GjUuFDb/R1NGe1OPzpA=="
)
SG_SIGNATURE = (
    "MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15Tlu"
    "LtEZtM="
)
SG_TIMESTAMP = "1600112502"
SG_EVENT = {
    "email": "hello@world.com",
    "event": "dropped",
    "reason": "Bounced Address",
    "sg_event_id": "ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA",
    "sg_message_id": "LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",
    "smtp-id": "<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>",
    "timestamp": 1600112492,
}
# The body exactly as SendGrid sent it, trailing CRLF included.
SG_PAYLOAD = (json.dumps([SG_EVENT], sort_keys=True, separators=(",", ":")) + "\r\n").encode()

# Twilio's published test vector (twilio-python, tests/unit/test_request_validator.py).
TW_TOKEN = "12345"
TW_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TW_PARAMS = {
    "CallSid": ["CA1234567890ABCDE"],
    "Digits": ["1234"],
    "From": ["+14158675309"],
    "To": ["+18005551212"],
    "Caller": ["+14158675309"],
}
TW_EXPECTED = "RSOYDt4T1cUTdK1PDd93/VVr8B8="


# --------------------------------------------------------------------------- the algorithms


def test_sendgrids_published_signature_verifies_and_any_change_does_not() -> None:
    key = load_sendgrid_key(SG_PUBLIC_KEY)
    verify_sendgrid(key, SG_PAYLOAD, SG_SIGNATURE, SG_TIMESTAMP)
    for body, signature, stamp, with_key in (
        (b"payload", SG_SIGNATURE, SG_TIMESTAMP, key),
        (SG_PAYLOAD, SG_SIGNATURE, "timestamp", key),
        (SG_PAYLOAD, SG_SIGNATURE, SG_TIMESTAMP, load_sendgrid_key(SG_OTHER_KEY)),
        (SG_PAYLOAD, SG_SIGNATURE[:-8] + "AAAAAAA=", SG_TIMESTAMP, key),
        (SG_PAYLOAD, "not base64!", SG_TIMESTAMP, key),
    ):
        with pytest.raises(SignatureRefused) as refused:
            verify_sendgrid(with_key, body, signature, stamp)
        assert refused.value.status == 403
    with pytest.raises(SignatureRefused) as unsigned:
        verify_sendgrid(key, SG_PAYLOAD, None, SG_TIMESTAMP)
    assert unsigned.value.status == 401
    assert "X-Twilio-Email-Event-Webhook-Signature: missing" in unsigned.value.message
    with pytest.raises(LedgerError, match="not a public key"):
        load_sendgrid_key("hello")
    rsa_like = base64.b64encode(
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).decode()
    with pytest.raises(LedgerError, match="P-256"):
        load_sendgrid_key(rsa_like)


def test_twilios_published_signatures_including_port_variants() -> None:
    assert twilio_signature(TW_TOKEN, TW_URL, TW_PARAMS) == TW_EXPECTED
    duplicates = {"Sid": ["CA123"], "SidAccount": ["AC123"], "Digits": ["5678", "1234"]}
    assert twilio_signature(TW_TOKEN, TW_URL, duplicates) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="
    # The published port cases: Twilio may have signed the URL with or without its port.
    https_port = TW_URL.replace(".com", ".com:1234")
    http_port = https_port.replace("https", "http")
    for url, expected in (
        (TW_URL, TW_EXPECTED),
        (https_port, TW_EXPECTED),
        (http_port, "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="),
        (TW_URL, "kvajT1Ptam85bY51eRf/AJRuM3w="),
        (TW_URL.replace("https", "http"), "0ZXoZLH/DfblKGATFgpif+LLRf4="),
    ):
        verify_twilio(TW_TOKEN, twilio_urls(url), TW_PARAMS, expected)
    with pytest.raises(SignatureRefused) as bad:
        verify_twilio("54321", twilio_urls(TW_URL), TW_PARAMS, TW_EXPECTED)
    assert bad.value.status == 403 and "https://mycompany.com/myapp.php" in bad.value.message
    tampered = {**TW_PARAMS, "Digits": ["9999"]}
    with pytest.raises(SignatureRefused):
        verify_twilio(TW_TOKEN, twilio_urls(TW_URL), tampered, TW_EXPECTED)
    with pytest.raises(SignatureRefused) as unsigned:
        verify_twilio(TW_TOKEN, twilio_urls(TW_URL), TW_PARAMS, "")
    assert unsigned.value.status == 401


# --------------------------------------------------------------------------- over HTTP


def twilio_sign(token: str, url: str, body: str) -> str:
    """The signer as Twilio documents it, written here independently of the collector."""
    params = parse_qs(body, keep_blank_values=True)
    data = url + "".join(k + v for k in sorted(params) for v in sorted(set(params[k])))
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


TOKEN = "f3a1c9e07b2d4c8e9a6b5d4c3b2a1f0e"  # the shape of a Twilio auth token


def cli(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledger", "sources", *args],
        capture_output=True,
        text=True,
        env={**cli_env(home), "COLUMNS": "250"},
        timeout=60,
        input=stdin,
    )


@pytest.fixture(scope="module")
def signed(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Server, dict[str, str], ec.EllipticCurvePrivateKey]]:
    home = tmp_path_factory.mktemp("signing") / "home"
    keys = {
        "sendgrid": add_source(home, "sendgrid", "email"),
        "mailer": add_source(home, "mailer", "email"),
        "twilio": add_source(home, "twilio", "call"),
        "proxied": add_source(home, "proxied", "call"),
    }
    own = ec.generate_private_key(ec.SECP256R1())
    pem = (
        own.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    for args, stdin in (
        (("signing", "sendgrid", "--sendgrid-key", SG_PUBLIC_KEY), None),
        (("signing", "mailer", "--sendgrid-key", "-"), pem),
        (("signing", "twilio", "--twilio-token", "-"), TOKEN + "\n"),
        (
            (
                "signing",
                "proxied",
                "--twilio-token",
                "-",
                "--public-url",
                "https://calls.example.com/",
            ),
            TOKEN,
        ),
    ):
        done = cli(home, *args, stdin=stdin)
        assert done.returncode == 0, done.stderr
        assert "signatures required" in done.stdout
        assert TOKEN not in done.stdout + done.stderr
    server = Server(home).start()
    yield server, keys, own
    server.stop()


def stored(home: Path) -> dict[str, Any]:
    with Ledger.open(Settings(home=home, master_key=TEST_MASTER_KEY)) as ledger:
        return {e.event_id: e for e in ledger.read(0, 100_000, decrypt=True)}


def test_sendgrid_signed_event_webhook_over_http(
    signed: tuple[Server, dict[str, str], ec.EllipticCurvePrivateKey],
) -> None:
    server, keys, own = signed
    url = server.url + "/webhooks/sendgrid"
    headers = {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": SG_SIGNATURE,
        "X-Twilio-Email-Event-Webhook-Timestamp": SG_TIMESTAMP,
    }
    # SendGrid's own signed request, byte for byte.
    ok = requests.post(url, data=SG_PAYLOAD, headers=headers, auth=(keys["sendgrid"], ""))
    assert ok.status_code == 200, ok.text
    assert ok.json()["stored"] == 1
    event = stored(server.home)[event_id("sendgrid", f"sendgrid:{SG_EVENT['sg_event_id']}")]
    assert event.type == "email_bounced" and event.payload["reason"] == "dropped: Bounced Address"

    plain = {"Content-Type": "application/json"}
    unsigned = requests.post(url, data=SG_PAYLOAD, headers=plain, auth=(keys["sendgrid"], ""))
    assert unsigned.status_code == 401
    assert unsigned.json()["code"] == "unsigned"
    assert "X-Twilio-Email-Event-Webhook-Signature: missing" in unsigned.json()["message"]
    assert "WWW-Authenticate" not in unsigned.headers
    forged = SG_PAYLOAD.replace(b"Bounced Address", b"Spam Complaint!")
    bad = requests.post(url, data=forged, headers=headers, auth=(keys["sendgrid"], ""))
    assert bad.status_code == 403 and bad.json()["code"] == "bad_signature"
    assert "does not verify" in bad.json()["message"]
    # A source's key is its own: SendGrid's signature does not pass for `mailer`.
    other = requests.post(url, data=SG_PAYLOAD, headers=headers, auth=(keys["mailer"], ""))
    assert other.status_code == 403

    # A key configured as PEM; the signature made with cryptography as SendGrid makes it.
    body = orjson.dumps([{**sendgrid_sample()[2], "sg_event_id": "own-signed-1"}])
    stamp = str(int(time.time()))
    signature = base64.b64encode(
        own.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    ).decode()

    def post_mailer(timestamp: str) -> requests.Response:
        return requests.post(
            url,
            data=body,
            auth=(keys["mailer"], ""),
            headers={
                "X-Twilio-Email-Event-Webhook-Signature": signature,
                "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
            },
        )

    mine = post_mailer(stamp)
    assert mine.status_code == 200 and mine.json()["stored"] == 1, mine.text
    late = post_mailer(str(int(stamp) + 1))
    assert late.status_code == 403  # the timestamp is signed too


def test_twilio_signed_status_callbacks_over_http(
    signed: tuple[Server, dict[str, str], ec.EllipticCurvePrivateKey],
) -> None:
    server, keys, _ = signed
    path = "/webhooks/twilio/call-status?tenant=7"
    body = urlencode(twilio_callback(CallSid="CA-signed-1"))
    form = {"Content-Type": "application/x-www-form-urlencoded"}

    def post(key: str, signature: str | None, data: str = body) -> requests.Response:
        headers = {**form, **({"X-Twilio-Signature": signature} if signature else {})}
        return requests.post(server.url + path, data=data, headers=headers, auth=(key, ""))

    good = twilio_sign(TOKEN, server.url + path, body)
    answer = post(keys["twilio"], good)
    assert answer.status_code == 200 and answer.json()["stored"] == 1, answer.text
    assert event_id("twilio", "twilio:CA-signed-1") in stored(server.home)
    # Twilio also signs a URL that carries the credentials (how the write key travels).
    with_creds = server.url.replace("http://", f"http://{keys['twilio']}:@") + path
    assert post(keys["twilio"], twilio_sign(TOKEN, with_creds, body)).status_code == 200

    unsigned = post(keys["twilio"], None)
    assert unsigned.status_code == 401
    assert unsigned.json()["message"].startswith("X-Twilio-Signature: missing")
    wrong_token = post(keys["twilio"], twilio_sign("0" * 32, server.url + path, body))
    assert wrong_token.status_code == 403 and wrong_token.json()["code"] == "bad_signature"
    tampered = body.replace("CallDuration=42", "CallDuration=4200")
    assert post(keys["twilio"], good, tampered).status_code == 403
    other_path = twilio_sign(TOKEN, server.url + "/webhooks/twilio/call-status", body)
    assert post(keys["twilio"], other_path).status_code == 403  # the query string is signed

    # Behind a proxy: Twilio signed the public URL, the collector saw 127.0.0.1.
    public = "https://calls.example.com" + path
    proxied = post(keys["proxied"], twilio_sign(TOKEN, public, body))
    assert proxied.status_code == 200, proxied.text
    local = post(keys["proxied"], good)
    assert local.status_code == 403
    assert "https://calls.example.com/webhooks/twilio/call-status?tenant=7" in local.text
    assert "--public-url" in local.json()["message"]


def test_signing_config_is_listed_by_hint_stored_encrypted_and_can_be_cleared(
    signed: tuple[Server, dict[str, str], ec.EllipticCurvePrivateKey],
) -> None:
    server, keys, _ = signed
    listed = cli(server.home, "list")
    assert listed.returncode == 0, listed.stderr
    assert "twilio: auth token f3a1… (32 characters)" in listed.stdout
    assert "at https://calls.example.com" in listed.stdout
    assert "sendgrid: P-256 key sha256:" in listed.stdout
    assert TOKEN not in listed.stdout and TOKEN[4:] not in listed.stdout
    db = server.home / "ledger.db"
    on_disk = db.read_bytes() + Path(f"{db}-wal").read_bytes()
    assert TOKEN.encode() not in on_disk  # encrypted at rest, unlike the public key

    for args, message in (
        (("signing", "nobody", "--twilio-token", "x"), "no source named 'nobody'"),
        (("signing", "mailer", "--sendgrid-key", "hello"), "not a public key"),
        (("signing", "mailer", "--public-url", "https://x.example"), "has no Twilio auth token"),
        (("signing", "twilio", "--public-url", "ftp://x"), "expected the collector's base URL"),
        (("signing", "twilio", "--clear", "mailchimp"), "expected one of sendgrid, twilio"),
    ):
        failed = cli(server.home, *args)
        assert failed.returncode == 1 and message in failed.stderr, failed.stderr
        assert "Traceback" not in failed.stderr
    assert cli(server.home, "signing", "twilio").returncode == 2  # nothing to change
    helped = cli(server.home, "signing", "--help")
    assert helped.returncode == 0
    for option in ("--sendgrid-key", "--twilio-token", "--public-url", "--clear"):
        assert option in helped.stdout
    assert "signing" in cli(server.home, "--help").stdout

    cleared = cli(server.home, "signing", "twilio", "--clear", "twilio")
    assert cleared.returncode == 0 and "no longer required" in cleared.stdout
    # The running collector applies it within its one-second cache: wait for the sign.
    body = urlencode(twilio_callback(CallSid="CA-unsigned-after-clear"))
    deadline = time.monotonic() + 30
    while True:
        answer = requests.post(
            server.url + "/webhooks/twilio/call-status",
            data=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            auth=(keys["twilio"], ""),
        )
        if answer.status_code == 200 or time.monotonic() > deadline:
            break
        assert answer.status_code == 401
        time.sleep(0.2)
    assert answer.status_code == 200, answer.text


def test_a_secret_sealed_for_one_source_cannot_be_moved_to_another(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", master_key=TEST_MASTER_KEY)
    add_source(settings.home, "a", "call")
    add_source(settings.home, "b", "call")
    db = CollectorDB(settings)
    try:
        signing = WebhookSigning(db, bytes.fromhex(TEST_MASTER_KEY))
        signing.set_twilio("a", TOKEN, None)
        assert signing.get("a", "twilio", cached=False).secret == TOKEN  # type: ignore[union-attr]
        sealed = db.query("SELECT secret FROM collector_webhook_auth WHERE source = 'a'")[0][0]
        db.execute(
            "INSERT INTO collector_webhook_auth (source, provider, secret, hint, set_at) "
            "VALUES ('b', 'twilio', ?, 'copied', 'now')",
            [sealed],
        )
        with pytest.raises(LedgerError, match="auth token of source 'b' cannot be decrypted"):
            signing.get("b", "twilio", cached=False)
    finally:
        db.close()
