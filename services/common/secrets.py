"""What a credential looks like: the one list that the context service's redaction and deliberation's
policy.secrets check both use, so that a credential one of them knows, the other knows too. Pure: `re` only.

CREDENTIALS     credentials found by their own shape (AWS keys, private key blocks, GitHub/Slack/Google tokens,
                sk- API keys, JWTs, bearer tokens, the password in a URL). Each has a kind slug (redaction writes
                [REDACTED:<kind>]), a name in words (a finding says "<name> in the text"), the part to hide (the
                group `secret` when the pattern has one, otherwise the whole match) and its hints: lower-case
                substrings one of which every match contains.
KEY_WORDS       the words that make a name a credential's name (password, token, api_key, ...): the key of a
                `password = "..."` assignment. How literal the value must be is each consumer's call (redaction
                hides anything that is not a placeholder; the check flags only values that look like literals).
is_placeholder  a value that is a reference or a stand-in (${VAR}, <your key>, os.environ[...], changeme, str),
                never a secret.
HINTS           every pattern's hints and the key words': a text containing none of them (lower-cased) holds
                no credential, which lets redaction skip most texts with a few substring searches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class CredentialPattern:
    kind: str  # slug: "aws-access-key"
    name: str  # in words: "AWS access key id"
    regex: re.Pattern[str]
    hints: tuple[str, ...]  # lower-case; every match of `regex`, lower-cased, contains one of them

    def span(self, m: re.Match[str]) -> tuple[int, int]:
        """Where the credential itself is in the match `m`: the group `secret` if the pattern has one."""
        return m.span("secret") if "secret" in self.regex.groupindex else m.span()


_TOKEN = r"[A-Za-z0-9._~+/-]"  # RFC 6750 b64token characters

# Order matters to redaction, which replaces them one after the other: a JWT after "Bearer" is a jwt.
CREDENTIALS: tuple[CredentialPattern, ...] = (
    CredentialPattern(
        "private-key",
        "private key",
        # To the END line, or to the end of the text when it is cut off.
        re.compile(
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)",
            re.S,
        ),
        ("private key",),
    ),
    CredentialPattern(
        "aws-access-key",
        "AWS access key id",
        re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b"),
        ("akia", "asia", "agpa", "aida", "aroa", "anpa"),
    ),
    CredentialPattern(
        "aws-secret-key",
        "AWS secret access key",
        re.compile(r"(?i)aws_?secret_?access_?key\s*[\"']?\s*[:=]\s*[\"']?(?P<secret>[A-Za-z0-9/+=]{40})\b"),
        ("secret",),
    ),
    CredentialPattern(
        "github-token",
        "GitHub token",
        re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})"),
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    ),
    CredentialPattern(
        "slack-token",
        "Slack token",
        re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
        ("xox",),
    ),
    CredentialPattern(
        "api-key",
        "OpenAI-style API key",
        re.compile(r"\bsk-(?:proj-|ant-|live-|test-)?[A-Za-z0-9_-]{20,}"),
        ("sk-",),
    ),
    CredentialPattern(
        "google-api-key",
        "Google API key",
        re.compile(r"\bAIza[0-9A-Za-z_-]{35}"),
        ("aiza",),
    ),
    CredentialPattern(
        "jwt",
        "JSON web token",
        re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
        ("eyj",),
    ),
    CredentialPattern(
        "token",
        "bearer token",
        # The token has a digit or a capital after its first character: "basic containerization" is prose.
        re.compile(rf"\b(?i:bearer|basic)[ \t]+(?P<secret>{_TOKEN}(?={_TOKEN}*[0-9A-Z]){_TOKEN}{{15,}}=*)"),
        ("bearer", "basic"),
    ),
    CredentialPattern(
        "password",
        "credentials in a URL",
        # Not one already redacted: a URL copied from a redacted context is not a leak.
        re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s:/@]+:(?P<secret>(?!\[REDACTED)[^\s@/]+)@", re.I),
        ("://",),
    ),
)

# The names of credentials (as regex alternatives); each contains one of KEY_HINTS.
KEY_WORDS = r"password|passwd|passphrase|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credential"
KEY_HINTS = ("pass", "pwd", "secret", "token", "key", "credential")

HINTS: tuple[str, ...] = tuple(dict.fromkeys([*(h for p in CREDENTIALS for h in p.hints), *KEY_HINTS]))

_PLACEHOLDER = re.compile(
    r"""(?ix)
      [$<{\[*%].*                                   # ${VAR} $(cmd) $VAR <your key> {{ var }} [REDACTED] *** %(x)s
    | x{3,} | \.{3} | your[_-].*
    | os\.environ.* | os\.getenv.* | env\(.*\) | getenv\(.*\)
    | \(*(?:none|null|true|false|str|string|int|bool|required|optional|redacted|change[_-]?me|placeholder|dummy
        |example|secretkeyref|valuefrom)[)\]}]*
    """
)


def is_placeholder(value: str) -> bool:
    """Whether an assigned `value` (without its quotes) is a reference, a template, a type or a stand-in."""
    return bool(_PLACEHOLDER.fullmatch(value.strip()))
