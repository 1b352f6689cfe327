"""The one list of credential patterns: redaction's pre-filter holds for each, and both of its consumers (the
context service's redact() and deliberation's policy.secrets check) find every credential of every kind."""

import pytest

from services.common.secrets import CREDENTIALS, HINTS, KEY_HINTS, KEY_WORDS, is_placeholder
from services.context.domain import redact
from services.deliberation.checks import check_secrets

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlc2ln"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

# At least one sample of every kind, and one of every prefix a kind's hints name.
SAMPLES: dict[str, list[str]] = {
    "private-key": [
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
        "-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQOYBGZ1c2VyCg\n-----END PGP PRIVATE KEY BLOCK-----",
        "cut off: -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0B",
    ],
    "aws-access-key": [
        f"Deploy with {prefix}IOSFODNN7EXAMPLE now" for prefix in ("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA")
    ],
    "aws-secret-key": [f"aws_secret_access_key = {AWS_SECRET}", f'AWS_SECRET_ACCESS_KEY: "{AWS_SECRET}"'],
    "github-token": [
        *(f"clone with {prefix}{'a1B2' * 9}" for prefix in ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),
        "clone with github_pat_11ABCDEFG0" + "x1Y2z3" * 10,
    ],
    "slack-token": ["post with xoxb-1234567890-abcdefghij", "post with xoxp-0987654321-ZYXWVUTSRQ-1"],
    "api-key": [
        "OPENAI_API_KEY=sk-proj-abcdefghij0123456789XYZ",
        "call it with sk-ant-api03-" + "Ab1_" * 8,
        "use sk-" + "a1B2" * 8 + " today",
    ],
    "google-api-key": ["maps with AIza" + ("Sy" + "A1b2C3d4E5" * 4)[:35]],
    "jwt": [f"send {JWT} along"],
    "token": [
        "Authorization: Bearer abcdefghijklmnopqrstuvwxyz123456",
        "Authorization: Basic dXNlcjpwYXNzd29yZA==",
        "curl -H 'authorization: bearer 0f4c1e9a7b2d4c6e8a0b'",
    ],
    "password": [
        "Connect to postgres://orders:hunter2hunter2@db:5432/orders",
        "redis://default:verysecret@valkey:6379/0",
    ],
}

CASES = [(p, text) for p in CREDENTIALS for text in SAMPLES.get(p.kind, [])]


def case_id(case) -> str:
    pattern, text = case
    return f"{pattern.kind}:{text[:24]}"


def test_every_pattern_has_samples_and_kinds_are_unique():
    kinds = [p.kind for p in CREDENTIALS]
    assert len(set(kinds)) == len(kinds)
    assert set(SAMPLES) == set(kinds)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_match_contains_one_of_the_patterns_hints(case):
    """redact() skips a text holding none of HINTS: that is only right if every match holds one."""
    pattern, text = case
    assert all(h == h.lower() and h in HINTS for h in pattern.hints)
    matches = list(pattern.regex.finditer(text))
    assert matches, f"{pattern.kind} does not match its own sample"
    for m in matches:
        assert any(h in m.group(0).lower() for h in pattern.hints), (pattern.kind, m.group(0))


def test_every_key_word_contains_one_of_the_hints():
    assert set(KEY_HINTS) <= set(HINTS)
    for word in KEY_WORDS.split("|"):
        assert any(h in word for h in KEY_HINTS), word  # the words are literal bar the optional [_-]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_redaction_and_the_secrets_check_agree_on_every_credential(case):
    pattern, text = case
    m = pattern.regex.search(text)
    secret = text[slice(*pattern.span(m))]

    out, n = redact(text)
    assert secret not in out and n >= 1
    assert f"[REDACTED:{pattern.kind}]" in out

    result = check_secrets(text)
    assert not result.passed
    assert f"{pattern.name} in the text" in [f.message for f in result.findings]


@pytest.mark.parametrize(
    "text",
    [
        "the token budget is 2048 tokens",
        "basic containerization of the service",  # prose after "basic" is not a credential
        "use Bearer token authentication",
        "https://example.com/path@v1",
        "postgres://orders:[REDACTED:password]@db:5432/orders",  # copied from a redacted context
        "ghp_short and AKIA alone",
        "password: ${DB_PASSWORD}",
        "api_key: <your-api-key>",
        'password = os.environ["DB_PASSWORD"]',
        "token: str",
        "password: changeme",
    ],
)
def test_neither_flags_ordinary_text_or_placeholders(text):
    assert redact(text) == (text, 0)
    assert check_secrets(text).passed


@pytest.mark.parametrize(
    "value",
    [
        "${DB_PASSWORD}",
        "$(cat /run/secrets/db)",
        "$DB_PASSWORD",
        "{{ .Values.password }}",
        "<your-api-key>",
        "%(password)s",
        "********",
        "xxxx",
        "...",
        "changeme",
        "CHANGE_ME",
        "placeholder",
        "dummy",
        "example",
        "your-api-key",
        "None",
        "None)",
        "null",
        "true",
        "str",
        "string",
        "optional",
        "[REDACTED:secret]",
        "os.environ['DB_PASSWORD']",
        "os.getenv('DB_PASSWORD')",
        "getenv(DB_PASSWORD)",
        "env(DB_PASSWORD)",
        "secretKeyRef",
        "valueFrom",
    ],
)
def test_placeholders_are_not_secrets(value):
    assert is_placeholder(value)


@pytest.mark.parametrize("value", ["hunter2hunter2", "Sup3rS3cret!", "s3cr3t-value", "examples123", "nonexistent"])
def test_literals_are_not_placeholders(value):
    assert not is_placeholder(value)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_a_redacted_text_is_left_as_it_is(case):
    _, text = case
    once, _ = redact(text)
    assert redact(once) == (once, 0)
    assert check_secrets(once).passed
