"""Tests for guard.core.ruleset: pattern semantics, lookups, loading, errors, and the shipped rules."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.core.ruleset import (
    AddressHint,
    Category,
    HostRule,
    OuiRule,
    RuleError,
    RuleSet,
    builtin_rules_dir,
    check_dirs,
    load_rules,
    normalize_pattern,
)
from tests.ci import missing_or_fail

CAPTURES = Path(__file__).resolve().parents[1].parent / "shared" / "captures"


def hosts(*pairs: tuple[str, Category]) -> RuleSet:
    return RuleSet(hosts=tuple(HostRule(p, c, "[inf] test") for p, c in pairs))


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


HEAD = 'schema = 1\nvendor = "acme"\n'


# ---------------------------------------------------------------------------------------------
# Pattern semantics


def test_exact_pattern_matches_only_that_name() -> None:
    rs = hosts(("api.amazon.com", Category.SMART_HOME))
    assert rs.category_for_host("api.amazon.com") is Category.SMART_HOME
    assert rs.category_for_host("x.api.amazon.com") is Category.UNKNOWN
    assert rs.category_for_host("amazon.com") is Category.UNKNOWN


def test_leading_star_matches_any_depth_but_not_the_apex() -> None:
    rs = hosts(("*.example.com", Category.MEDIA))
    assert rs.category_for_host("a.example.com") is Category.MEDIA
    assert rs.category_for_host("a.b.c.example.com") is Category.MEDIA
    assert rs.category_for_host("example.com") is Category.UNKNOWN
    assert rs.category_for_host("badexample.com") is Category.UNKNOWN


def test_label_wildcard_does_not_cross_dots() -> None:
    rs = hosts(("avs-alexa-*.amazon.com", Category.VOICE))
    assert rs.category_for_host("avs-alexa-4-na.amazon.com") is Category.VOICE
    assert rs.category_for_host("avs-alexa-na.amazon.com") is Category.VOICE
    assert rs.category_for_host("avs-alexa-x.y.amazon.com") is Category.UNKNOWN
    assert rs.category_for_host("z.avs-alexa-x.amazon.com") is Category.UNKNOWN


def test_label_wildcard_needs_at_least_one_character() -> None:
    rs = hosts(("avs-alexa-*.amazon.com", Category.VOICE))
    assert rs.category_for_host("avs-alexa-.amazon.com") is Category.UNKNOWN


def test_whole_label_star_in_the_middle_matches_exactly_one_label() -> None:
    rs = hosts(("alexa.*.gateway.devices.a2z.com", Category.VOICE))
    assert rs.category_for_host("alexa.na.gateway.devices.a2z.com") is Category.VOICE
    assert rs.category_for_host("alexa.gateway.devices.a2z.com") is Category.UNKNOWN
    assert rs.category_for_host("alexa.a.b.gateway.devices.a2z.com") is Category.UNKNOWN


def test_matching_ignores_case_and_one_trailing_dot() -> None:
    rs = hosts(
        ("bob-dispatch-prod-*.amazon.com", Category.VOICE), ("Api.Amazon.COM.", Category.SMART_HOME)
    )
    assert rs.category_for_host("BOB-Dispatch-Prod-NA.Amazon.Com.") is Category.VOICE
    assert rs.category_for_host("api.amazon.com") is Category.SMART_HOME
    assert rs.category_for_host("API.AMAZON.COM.") is Category.SMART_HOME
    assert rs.category_for_host("api.amazon.com..") is Category.UNKNOWN


def test_exact_beats_every_wildcard() -> None:
    rs = hosts(
        ("*.amazon.com", Category.TELEMETRY),
        ("api.amazon.com", Category.SMART_HOME),
        ("ap*.amazon.com", Category.MEDIA),
    )
    assert rs.category_for_host("api.amazon.com") is Category.SMART_HOME
    assert rs.category_for_host("apx.amazon.com") is Category.MEDIA
    assert rs.category_for_host("other.amazon.com") is Category.TELEMETRY


def test_longer_literal_suffix_wins() -> None:
    rs = hosts(
        ("*.nest.com", Category.TELEMETRY),
        ("*.transport.home.nest.com", Category.SMART_HOME),
        ("*-na.amazon.com", Category.MEDIA),
        ("*.amazon.com", Category.TELEMETRY),
    )
    assert rs.category_for_host("a.transport.home.nest.com") is Category.SMART_HOME
    assert rs.category_for_host("a.home.nest.com") is Category.TELEMETRY
    assert rs.category_for_host("unagi-na.amazon.com") is Category.MEDIA
    assert rs.category_for_host("unagi-eu.amazon.com") is Category.TELEMETRY


def test_same_suffix_more_literal_characters_win() -> None:
    rs = hosts(
        ("*.amazon.com", Category.TELEMETRY), ("bob-dispatch-prod-*.amazon.com", Category.VOICE)
    )
    assert rs.category_for_host("bob-dispatch-prod-na.amazon.com") is Category.VOICE
    assert rs.category_for_host("bob.amazon.com") is Category.TELEMETRY


def test_full_tie_is_broken_by_pattern_text_whatever_the_order() -> None:
    a = ("a*.x.com", Category.VOICE)
    b = ("*b.x.com", Category.MEDIA)
    assert hosts(a, b).category_for_host("ab.x.com") is Category.MEDIA  # "*b.x.com" < "a*.x.com"
    assert hosts(b, a).category_for_host("ab.x.com") is Category.MEDIA


def test_match_host_returns_the_rule_with_vendor_and_source() -> None:
    rule = HostRule("guzzoni.apple.com", Category.VOICE, "[cap] x", vendor="apple")
    rs = RuleSet(hosts=(rule,))
    assert rs.match_host("GUZZONI.apple.com") == rule
    assert rs.vendor_for_host("guzzoni.apple.com") == "apple"
    assert rs.vendor_for_host("apple.com") is None
    assert rs.match_host("apple.com") is None


def test_non_ascii_name_never_matches_through_case_folding() -> None:
    # U+212A KELVIN SIGN lower-cases to an ASCII "k".
    rs = hosts(("kindle-time.amazon.com", Category.CONNECTIVITY))
    assert rs.category_for_host("\u212aindle-time.amazon.com") is Category.UNKNOWN


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a b.amazon.com", "x" * 300, "evil\x1b[2J.amazon.com", "*.amazon.com"]
)
def test_hostile_names_are_unknown(name: str) -> None:
    rs = hosts(("*.amazon.com", Category.TELEMETRY))
    assert rs.category_for_host(name) is Category.UNKNOWN


@given(st.text(max_size=300))
def test_match_host_never_raises(name: str) -> None:
    rs = hosts(("*.amazon.com", Category.TELEMETRY), ("a*b.x.com", Category.VOICE))
    rs.category_for_host(name)


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "com",
        "*.com",
        "amazon.*",
        "a*.com",
        "a..com",
        ".amazon.com",
        "a**.amazon.com",
        "a b.amazon.com",
        "a/b.amazon.com",
        "b\u00fccher.example.com",
        "x" * 64 + ".example.com",
    ],
)
def test_bad_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError):
        normalize_pattern(pattern)


def _ref_label(pattern: str, label: str) -> bool:
    # `*` is one or more characters: fnmatch's `?*`.
    return fnmatch.fnmatchcase(label, pattern.replace("*", "?*"))


def _ref_matches(pattern: str, name: str) -> bool:
    p, n = pattern.split("."), name.split(".")
    if p[0] == "*":
        rest = p[1:]
        return len(n) > len(rest) and all(map(_ref_label, rest, n[len(n) - len(rest) :]))
    return len(p) == len(n) and all(map(_ref_label, p, n))


def _ref_best(patterns: list[str], name: str) -> str | None:
    if name in patterns:
        return name
    found = [p for p in patterns if "*" in p and _ref_matches(p, name)]
    if not found:
        return None
    return min(found, key=lambda p: (-(len(p) - p.rfind("*") - 1), -(len(p) - p.count("*")), p))


_PATTERN_LABELS = st.sampled_from(["a", "b", "ab", "*", "a*", "*b", "a*b"])
_NAME_LABELS = st.sampled_from(["a", "b", "ab", "ba", "aab", "x", "y"])
_TAILS = st.sampled_from(["x.com", "y.x.com", "a.x.com"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.lists(_PATTERN_LABELS, max_size=3), _TAILS), min_size=1, max_size=8),
    st.lists(_NAME_LABELS, max_size=4),
    _TAILS,
)
def test_indexed_matching_agrees_with_the_naive_definition(
    raw: list[tuple[list[str], str]], head: list[str], tail: str
) -> None:
    patterns = sorted({".".join([*labels, t]) for labels, t in raw})
    rs = RuleSet(hosts=tuple(HostRule(p, Category.VOICE, p) for p in patterns))
    name = ".".join([*head, tail])
    rule = rs.match_host(name)
    assert (rule.pattern if rule else None) == _ref_best(patterns, name)


# ---------------------------------------------------------------------------------------------
# OUIs and address hints


def test_vendor_for_mac_accepts_any_case_and_separator() -> None:
    rs = RuleSet(ouis=(OuiRule("68:db:f5", "amazon", "[cap] x"),))
    for mac in (
        "68:db:f5:90:19:64",
        "68-DB-F5-90-19-64",
        "68dbf5901964",
        "68db.f590.1964",
        "68:DB:F5",
    ):
        assert rs.vendor_for_mac(mac) == "amazon", mac
    assert rs.match_mac("68:db:f5:00:00:01") == rs.ouis[0]


@pytest.mark.parametrize(
    "mac", ["", "68:db", "68:db:f5:90:19", "zz:db:f5:90:19:64", "6a:db:f5:90:19:64"]
)
def test_vendor_for_mac_unknown_or_malformed_is_none(mac: str) -> None:
    rs = RuleSet(ouis=(OuiRule("68:db:f5", "amazon", "[cap] x"),))
    assert rs.vendor_for_mac(mac) is None


def test_address_hints_longest_prefix_wins_ipv4_and_ipv6() -> None:
    rs = RuleSet(
        hints=(
            AddressHint("52.94.0.0/16", Category.VOICE, "wide", vendor="a"),
            AddressHint("52.94.233.0/24", Category.VOICE, "narrow", vendor="b"),
            AddressHint("2001:db8::/32", Category.VOICE, "v6", vendor="c"),
        )
    )
    assert rs.match_address("52.94.233.109").source == "narrow"
    assert rs.match_address("52.94.1.1").source == "wide"
    assert rs.match_address("::ffff:52.94.233.1").source == "narrow"
    assert rs.match_address("2001:db8:1::5").source == "v6"
    assert rs.category_for_address("52.94.233.109") is Category.VOICE
    assert rs.category_for_address("52.95.0.1") is None
    assert rs.category_for_address("2001:db9::1") is None
    assert rs.category_for_address("not an address") is None
    assert RuleSet().category_for_address("52.94.233.109") is None


def test_hand_built_rules_are_normalised() -> None:
    rs = RuleSet(
        hosts=(HostRule("API.Amazon.com.", Category.SMART_HOME, "x"),),
        ouis=(OuiRule("68-DB-F5", "amazon", "x"),),
        hints=(AddressHint("2001:DB8::/32", Category.VOICE, "x"),),
    )
    assert rs.hosts[0].pattern == "api.amazon.com"
    assert rs.ouis[0].prefix == "68:db:f5"
    assert rs.hints[0].cidr == "2001:db8::/32"
    with pytest.raises(ValueError):
        RuleSet(hosts=(HostRule("*.com", Category.VOICE, "x"),))
    with pytest.raises(ValueError):
        RuleSet(hints=(AddressHint("52.94.233.1/24", Category.VOICE, "x"),))


def test_ruleset_is_immutable_and_hashable() -> None:
    rs = hosts(("api.amazon.com", Category.SMART_HOME))
    with pytest.raises(dataclasses.FrozenInstanceError):
        rs.hosts = ()  # type: ignore[misc]
    assert hash(rs) == hash(hosts(("api.amazon.com", Category.SMART_HOME)))


# ---------------------------------------------------------------------------------------------
# Loading and overriding


def test_load_builds_all_entry_kinds_with_their_place(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "acme.toml",
        HEAD
        + '[[host]]\npattern = "Voice.Acme.com."\ncategory = "voice"\nsource = "[doc] a"\n'
        + '[[oui]]\nprefix = "AA-BB-CC"\nsource = "[doc] b"\n'
        + '[[address_hint]]\ncidr = "198.51.100.0/24"\ncategory = "voice"\nsource = "[cap] c"\n',
    )
    rs = load_rules([tmp_path], builtin=False)
    assert rs.hosts == (
        HostRule("voice.acme.com", Category.VOICE, "[doc] a", "acme", str(path), 3),
    )
    assert rs.ouis == (OuiRule("aa:bb:cc", "acme", "[doc] b", str(path), 7),)
    assert rs.hints == (
        AddressHint("198.51.100.0/24", Category.VOICE, "[cap] c", "acme", str(path), 10),
    )
    assert rs.vendors == {"acme"}


def test_file_without_vendor_gives_host_rules_no_vendor(tmp_path: Path) -> None:
    write(
        tmp_path,
        "c.toml",
        'schema = 1\n[[host]]\npattern = "*.pool.ntp.org"\n'
        'category = "connectivity"\nsource = "[doc] x"\n',
    )
    rs = load_rules([tmp_path], builtin=False)
    assert rs.category_for_host("2.android.pool.ntp.org") is Category.CONNECTIVITY
    assert rs.vendor_for_host("2.android.pool.ntp.org") is None
    assert rs.vendors == frozenset()


def test_a_later_directory_replaces_same_keys_and_adds_others(tmp_path: Path) -> None:
    base, extra = tmp_path / "base", tmp_path / "extra"
    write(
        base,
        "acme.toml",
        HEAD
        + '[[host]]\npattern = "m.acme.com"\ncategory = "telemetry"\nsource = "[cap] base"\n'
        + '[[host]]\npattern = "keep.acme.com"\ncategory = "media"\nsource = "[cap] base"\n'
        + '[[oui]]\nprefix = "aa:bb:cc"\nsource = "[doc] base"\n'
        + '[[address_hint]]\ncidr = "198.51.100.0/24"\ncategory = "voice"\nsource = "[cap] base"\n',
    )
    write(
        extra,
        "local.toml",
        'schema = 1\nvendor = "mine"\n'
        + '[[host]]\npattern = "M.acme.com."\ncategory = "messaging"\nsource = "[inf] mine"\n'
        + '[[host]]\npattern = "new.acme.com"\ncategory = "update"\nsource = "[inf] mine"\n'
        + '[[oui]]\nprefix = "AA-BB-CC"\nsource = "[inf] mine"\n'
        + '[[address_hint]]\ncidr = "198.51.100.0/24"\ncategory = "voice"\nsource = "[inf] mine"\n',
    )
    rs = load_rules([base, extra], builtin=False)
    assert rs.category_for_host("m.acme.com") is Category.MESSAGING
    assert rs.vendor_for_host("m.acme.com") == "mine"
    assert rs.category_for_host("keep.acme.com") is Category.MEDIA
    assert rs.category_for_host("new.acme.com") is Category.UPDATE
    assert rs.vendor_for_mac("aa:bb:cc:00:00:01") == "mine"
    assert rs.match_address("198.51.100.7").source == "[inf] mine"
    assert len(rs.hosts) == 3 and len(rs.ouis) == 1 and len(rs.hints) == 1


def test_extra_directory_overrides_the_builtin_rules(tmp_path: Path) -> None:
    write(
        tmp_path,
        "override.toml",
        'schema = 1\n[[host]]\npattern = "device-metrics-*.amazon.com"\ncategory = "unknown"\n'
        'source = "[inf] inspect it here"\n',
    )
    rs = load_rules([tmp_path])
    assert rs.category_for_host("device-metrics-us.amazon.com") is Category.UNKNOWN
    assert rs.category_for_host("unagi-na.amazon.com") is Category.TELEMETRY


def test_a_single_file_may_be_given_instead_of_a_directory(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "one.toml",
        HEAD + '[[host]]\npattern = "a.acme.com"\ncategory = "media"\nsource = "x"\n',
    )
    assert load_rules([path], builtin=False).category_for_host("a.acme.com") is Category.MEDIA


def test_hidden_and_non_toml_files_are_ignored(tmp_path: Path) -> None:
    write(tmp_path, ".swap.toml", "garbage [[[")
    write(tmp_path, "notes.txt", "garbage [[[")
    assert load_rules([tmp_path], builtin=False) == RuleSet()


# ---------------------------------------------------------------------------------------------
# Errors: every kind names its file and line


def one_error(tmp_path: Path, text: str) -> RuleError:
    path = write(tmp_path, "bad.toml", text)
    errors = check_dirs([tmp_path], builtin=False)
    assert len(errors) == 1, [str(e) for e in errors]
    err = errors[0]
    assert err.file == str(path)
    with pytest.raises(RuleError) as raised:
        load_rules([tmp_path], builtin=False)
    assert str(raised.value) == str(err)
    return err


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (HEAD + "[[host]]\npattern = \n", 4, "TOML syntax: Invalid value (column"),
        (HEAD + '[[host]]\npattern = "a.b.com"\npattern = "c.b.com"\n', 5, "TOML syntax"),
        (HEAD + '[[host]]\npattern = "a.b.com\n', 4, "TOML syntax"),
        (HEAD + 'colour = "red"\n', 3, "unknown key 'colour'"),
        (
            HEAD + '[[host]]\npattern = "a.b.com"\ncategory = "voice"\nsource = "x"\nweight = 3\n',
            7,
            "unknown key 'weight' in [[host]]",
        ),
        (
            HEAD + '[[host]]\npattern = "a.b.com"\ncategory = 7\nsource = "x"\n',
            5,
            "'category' must be a string",
        ),
        (
            HEAD + '[[host]]\npattern = ["a.b.com"]\ncategory = "voice"\nsource = "x"\n',
            4,
            "'pattern' must be a string",
        ),
        (
            HEAD + '[[host]]\npattern = "a.b.com"\ncategory = "voce"\nsource = "x"\n',
            5,
            "unknown category 'voce'",
        ),
        (HEAD + '[[host]]\npattern = "a.b.com"\ncategory = "voice"\n', 3, "has no 'source'"),
        (
            HEAD + '[[host]]\npattern = "a.b.com"\ncategory = "voice"\nsource = "  "\n',
            6,
            "empty 'source'",
        ),
        (
            HEAD + '[[host]]\npattern = ""\ncategory = "voice"\nsource = "x"\n',
            4,
            "empty host pattern",
        ),
        (
            HEAD + '[[host]]\npattern = "a..b.com"\ncategory = "voice"\nsource = "x"\n',
            4,
            "empty label",
        ),
        (
            HEAD + '[[host]]\npattern = "*.com"\ncategory = "voice"\nsource = "x"\n',
            4,
            "last two labels",
        ),
        (HEAD + '\n[[oui]]\nprefix = "68:db:f5:90"\nsource = "x"\n', 5, "bad OUI '68:db:f5:90'"),
        (HEAD + '[[oui]]\nprefix = "68:db-f5"\nsource = "x"\n', 4, "bad OUI"),
        (HEAD + '[[oui]]\nprefix = 6871\nsource = "x"\n', 4, "'prefix' must be a string"),
        (
            'schema = 1\n\n[[oui]]\nprefix = "68:db:f5"\nsource = "x"\n',
            3,
            "need a top-level 'vendor'",
        ),
        (
            HEAD + '[[address_hint]]\ncidr = "52.94.300.0/24"\ncategory = "voice"\nsource = "x"\n',
            4,
            "bad CIDR",
        ),
        (
            HEAD + '[[address_hint]]\ncidr = "52.94.233.1/24"\ncategory = "voice"\nsource = "x"\n',
            4,
            "host bits",
        ),
        (
            HEAD + '[[address_hint]]\ncidr = "17.0.0.0/8"\ncategory = "voice"\nsource = "x"\n',
            4,
            "too wide",
        ),
        (
            HEAD + '[[address_hint]]\ncidr = "2001::/16"\ncategory = "voice"\nsource = "x"\n',
            4,
            "too wide",
        ),
        (
            HEAD
            + '[[address_hint]]\ncidr = "52.94.233.0/24"\ncategory = "telemetry"\nsource = "x"\n',
            5,
            "may only say 'voice'",
        ),
        ('vendor = "acme"\n', 1, "missing 'schema = 1'"),
        ('schema = 2\nvendor = "acme"\n', 1, "unsupported schema 2"),
        ("schema = true\n", 1, "unsupported schema True"),
        ('schema = 1\nvendor = "ACME Inc"\n', 2, "vendor must be"),
        ('schema = 1\nhost = "a.b.com"\n', 2, "must be an array of tables"),
    ],
)
def test_each_error_names_file_and_line(
    tmp_path: Path, text: str, line: int, fragment: str
) -> None:
    err = one_error(tmp_path, text)
    assert err.line == line, str(err)
    assert fragment in err.message, str(err)
    assert str(err) == f"{err.file}:{line}: {err.message}"


@pytest.mark.parametrize(
    ("entry", "second_line"),
    [
        ('[[host]]\npattern = "a.b.com"\ncategory = "voice"\nsource = "x"\n', 7),
        ('[[oui]]\nprefix = "aa:bb:cc"\nsource = "x"\n', 6),
        ('[[address_hint]]\ncidr = "198.51.100.0/24"\ncategory = "voice"\nsource = "x"\n', 7),
    ],
)
def test_duplicate_entry_in_one_file_is_reported_at_the_second(
    tmp_path: Path, entry: str, second_line: int
) -> None:
    err = one_error(
        tmp_path,
        HEAD + entry + entry.replace("aa:bb:cc", "AA-BB-CC").replace("a.b.com", "A.B.com."),
    )
    assert err.line == second_line
    assert "duplicate" in err.message and "first at line 3" in err.message


def test_duplicate_across_files_of_one_directory_names_the_first(tmp_path: Path) -> None:
    entry = '[[host]]\npattern = "a.b.com"\ncategory = "voice"\nsource = "x"\n'
    first = write(tmp_path, "a.toml", HEAD + entry)
    second = write(tmp_path, "b.toml", HEAD + "\n" + entry)
    errors = check_dirs([tmp_path], builtin=False)
    assert [str(e) for e in errors] == [
        f"{second}:4: duplicate host 'a.b.com' (first at {first}:3)"
    ]


def test_inline_array_entries_point_at_their_key_line(tmp_path: Path) -> None:
    err = one_error(
        tmp_path, HEAD + 'host = [\n  { pattern = "a.b.com", category = "vox", source = "x" },\n]\n'
    )
    assert err.line == 3 and "unknown category 'vox'" in err.message


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b"schema = 1\n# caf\xe9\n")
    errors = check_dirs([tmp_path], builtin=False)
    assert [(e.file, e.line) for e in errors] == [(str(path), 2)]


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    errors = check_dirs([missing], builtin=False)
    assert [str(e) for e in errors] == [f"{missing}: no such rules directory"]


def test_check_dirs_reports_every_error_in_every_file(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.toml",
        HEAD
        + '[[host]]\npattern = "a.b.com"\ncategory = "voce"\nsource = "x"\n'  # line 5
        + '[[host]]\npattern = "*.com"\ncategory = "voice"\nsource = ""\n'  # lines 8, 10
        + '[[oui]]\nprefix = "nope"\nsource = "x"\n',  # line 12
    )
    write(tmp_path, "b.toml", "schema = 1\nvendor = \n")
    write(
        tmp_path,
        "c.toml",
        HEAD + '[[host]]\npattern = "fine.b.com"\ncategory = "voice"\nsource = "x"\n',
    )
    errors = check_dirs([tmp_path], builtin=False)
    assert [(Path(e.file).name, e.line) for e in errors] == [
        ("a.toml", 5),
        ("a.toml", 8),
        ("a.toml", 10),
        ("a.toml", 12),
        ("b.toml", 2),
    ]
    with pytest.raises(RuleError) as raised:
        load_rules([tmp_path], builtin=False)
    assert raised.value.line == 5


def test_rule_error_without_line_prints_file_only() -> None:
    assert str(RuleError("x.toml", 0, "boom")) == "x.toml: boom"
    assert str(RuleError(Path("x.toml"), 3, "boom")) == "x.toml:3: boom"


# ---------------------------------------------------------------------------------------------
# The shipped rules


@pytest.fixture(scope="module")
def shipped() -> RuleSet:
    return load_rules([])


def test_builtin_rules_are_found_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    directory = builtin_rules_dir()
    assert directory.is_absolute()
    assert {p.name for p in directory.glob("*.toml")} >= {
        "amazon.toml",
        "google.toml",
        "apple.toml",
        "sonos.toml",
    }
    assert load_rules([]).vendors >= {"amazon", "google", "apple", "sonos"}


def test_shipped_rules_check_cleanly() -> None:
    assert [str(e) for e in check_dirs([])] == []


_TAG = re.compile(r"\[(cap|doc|code|issue|inf)[\]:/ ]")


def test_every_shipped_entry_cites_a_tagged_source(shipped: RuleSet) -> None:
    for entry in (*shipped.hosts, *shipped.ouis, *shipped.hints):
        assert _TAG.search(entry.source), entry


def test_shipped_address_hints_are_voice_only(shipped: RuleSet) -> None:
    assert {h.category for h in shipped.hints} == {Category.VOICE}


@pytest.mark.parametrize(
    ("name", "category", "vendor"),
    [
        # endpoints.md, Amazon
        ("bob-dispatch-prod-na.amazon.com", Category.VOICE, "amazon"),
        ("bob-dispatch-prod-eu.amazon.com", Category.VOICE, "amazon"),
        ("avs-alexa-12-eu.amazon.com", Category.VOICE, "amazon"),
        ("avs-alexa-fe.amazon.com", Category.VOICE, "amazon"),
        ("alexa.na.gateway.devices.a2z.com", Category.VOICE, "amazon"),
        ("api.amazonalexa.com", Category.SMART_HOME, "amazon"),
        ("api.eu.amazonalexa.com", Category.SMART_HOME, "amazon"),
        ("api.fe.amazonalexa.com", Category.SMART_HOME, "amazon"),
        ("api.amazon.com", Category.SMART_HOME, "amazon"),
        ("alexa-comms-mobile-service.amazon.com", Category.MESSAGING, "amazon"),
        ("sip.amcs-tachyon.com", Category.MESSAGING, "amazon"),
        ("device-metrics-us.amazon.com", Category.TELEMETRY, "amazon"),
        ("device-metrics-us-2.amazon.com", Category.TELEMETRY, "amazon"),
        ("unagi-na.amazon.com", Category.TELEMETRY, "amazon"),
        ("fls-na.amazon.com", Category.TELEMETRY, "amazon"),
        ("d3p8zr0ffa9t17.cloudfront.net", Category.CONNECTIVITY, "amazon"),
        ("fireoscaptiveportal.com", Category.CONNECTIVITY, "amazon"),
        ("acsechocaptiveportal.com", Category.CONNECTIVITY, "amazon"),
        ("web.diagnostic.networking.aws.dev", Category.CONNECTIVITY, "amazon"),
        ("ntp-g7g.amazon.com", Category.CONNECTIVITY, "amazon"),
        ("kindle-time.amazon.com", Category.CONNECTIVITY, "amazon"),
        ("dp-gw-na.amazon.com", Category.CONNECTIVITY, "amazon"),
        ("dcape-na.amazon.com", Category.CONNECTIVITY, "amazon"),
        ("arcus-uswest.amazon.com", Category.CONNECTIVITY, "amazon"),
        ("mlis.amazon.com", Category.CONNECTIVITY, "amazon"),
        ("tinytts.amazon.com", Category.CONNECTIVITY, "amazon"),
        ("layla.amazon.com", Category.CONNECTIVITY, "amazon"),
        ("amzdigital-a.akamaihd.net", Category.MEDIA, "amazon"),
        ("softwareupdates.amazon.com", Category.UPDATE, "amazon"),
        # endpoints.md, Google
        ("embeddedassistant.googleapis.com", Category.VOICE, "google"),
        ("assistant-s3-pa.googleapis.com", Category.VOICE, "google"),
        ("googlehomefoyer-pa.googleapis.com", Category.SMART_HOME, "google"),
        ("frontdoor.transport.home.nest.com", Category.SMART_HOME, "google"),
        ("clients3.google.com", Category.CONNECTIVITY, "google"),
        ("connectivitycheck.gstatic.com", Category.CONNECTIVITY, "google"),
        ("mtalk.google.com", Category.CONNECTIVITY, "google"),
        ("storage.googleapis.com", Category.UNKNOWN, None),  # no rule for all of googleapis.com
        # endpoints.md, Apple
        ("guzzoni.apple.com", Category.VOICE, "apple"),
        ("api.smoot.apple.com", Category.VOICE, "apple"),
        ("mesu.apple.com", Category.UPDATE, "apple"),
        ("setup.icloud.com", Category.CONNECTIVITY, "apple"),
        ("time-ios.apple.com", Category.CONNECTIVITY, "apple"),
        ("cma.itunes.apple.com", Category.UNKNOWN, "apple"),
        # endpoints.md, Sonos
        ("api.ws.sonos.com", Category.SMART_HOME, "sonos"),
        ("msmetrics.ws.sonos.com", Category.TELEMETRY, "sonos"),
        ("update-software.sonos.com", Category.UPDATE, "sonos"),
        ("update-firmware.sonos.com", Category.UPDATE, "sonos"),
    ],
)
def test_shipped_rules_categorise_the_documented_hosts(
    shipped: RuleSet, name: str, category: Category, vendor: str | None
) -> None:
    assert shipped.category_for_host(name) is category
    assert shipped.vendor_for_host(name) == vendor


@pytest.mark.parametrize(
    ("name", "category"),
    [
        # Names in the shared captures' DNS questions, CNAMEs and SNI (speakers only).
        ("avs-alexa-4-na.amazon.com", Category.VOICE),
        ("api.amazonalexa.com.cdn.amazon.com", Category.SMART_HOME),
        ("spectrum.s3.amazonaws.com", Category.CONNECTIVITY),
        ("s3-1-w.amazonaws.com", Category.UNKNOWN),  # generic S3: anyone's bucket
        ("s3-directional-w.amazonaws.com", Category.UNKNOWN),
        ("d3h5bk8iotgjvw.cloudfront.net", Category.CONNECTIVITY),
        ("d1gsg05rq1vjdw.cloudfront.net", Category.UNKNOWN),
        ("prod.amazoncrl.com", Category.CONNECTIVITY),
        ("2.android.pool.ntp.org", Category.CONNECTIVITY),
        ("origin.guzzoni-apple.com.akadns.net", Category.VOICE),
        ("st14p01sa.guzzoni-apple.com.akadns.net", Category.VOICE),
        ("mesu.apple.com.edgekey.net", Category.UPDATE),
        ("mesu-cdn.origin-apple.com.akadns.net", Category.UPDATE),
        ("time-ios.g.aaplimg.com", Category.CONNECTIVITY),
        ("e6858.dsce9.akamaiedge.net", Category.UNKNOWN),
    ],
)
def test_shipped_rules_categorise_names_seen_in_the_captures(
    shipped: RuleSet, name: str, category: Category
) -> None:
    assert shipped.category_for_host(name) is category


@pytest.mark.parametrize(
    ("mac", "vendor"),
    [
        ("68:db:f5:90:19:64", "amazon"),  # smart-speakers-study echodot3a
        ("fc:65:de:5f:15:0a", "amazon"),
        ("4c:ef:c0:03:f2:38", "amazon"),  # vcfingerprinting sean_kennedy Echo
        ("c4:95:00:e3:93:2f", "amazon"),  # vcfingerprinting haipeng_li Echo
        ("44:65:0d:00:00:01", "amazon"),
        ("88:71:e5:00:00:01", "amazon"),
        ("a0:d0:dc:00:00:01", "amazon"),
        ("d4:a3:3d:6b:1e:97", "apple"),  # HomePod
        ("44:07:0b:50:4d:df", "google"),  # smart-speakers-study google-home-mini2
        ("94:9f:3e:00:00:01", "sonos"),
        ("f0:18:98:10:e8:90", None),  # the Mac laptop in haipeng_li: Apple, not a HomePod block
        ("f8:7b:20:53:79:d8", None),  # Cisco gateway
        ("1e:f2:0c:cc:ed:1c", None),  # locally administered
        ("00:04:3c:00:00:01", None),  # "SONOS Co., Ltd.", an unrelated company
    ],
)
def test_shipped_ouis_identify_the_capture_macs(
    shipped: RuleSet, mac: str, vendor: str | None
) -> None:
    assert shipped.vendor_for_mac(mac) == vendor


def test_shipped_macs_of_captures_sources_md(shipped: RuleSet) -> None:
    sources = CAPTURES / "smart-speakers-study" / "SOURCES.md"
    if not sources.exists():
        missing_or_fail("shared captures not present")
    text = sources.read_text()
    assert "68:db:f5:90:19:64" in text and "d4:a3:3d:6b:1e:97" in text
    assert shipped.vendor_for_mac("68:db:f5:90:19:64") == "amazon"
    assert shipped.vendor_for_mac("d4:a3:3d:6b:1e:97") == "apple"


def test_labelled_voice_remotes_get_a_voice_hint(shipped: RuleSet) -> None:
    labels = CAPTURES / "labels.toml"
    if not labels.exists():
        missing_or_fail("shared captures not present")
    remotes = {
        voice["remote"].rsplit(":", 1)[0]
        for capture in tomllib.loads(labels.read_text())["capture"]
        for voice in capture.get("voice", [])
    }
    assert remotes
    for addr in remotes:
        assert shipped.category_for_address(addr) is Category.VOICE, addr


@pytest.mark.parametrize(
    "addr",
    [
        # Non-voice Amazon services answering from Amazon space in the shared captures.
        "52.94.232.195",  # unagi-na
        "54.239.26.255",  # unagi-na
        "54.239.29.0",  # unagi-na
        "52.94.228.52",  # device-metrics-us
        "52.46.129.41",  # device-metrics-us
        "54.239.19.125",  # device-metrics-us
        "52.94.232.230",  # dp-gw-na
        "54.239.27.11",  # dp-gw-na
        "52.94.241.86",  # kindle-time
        "52.46.157.6",  # dcape-na
        "17.248.138.12",  # setup.icloud.com
        "17.57.144.53",  # Apple push
        "172.217.4.34",  # Google front end
    ],
)
def test_shipped_hints_do_not_cover_known_non_voice_addresses(shipped: RuleSet, addr: str) -> None:
    assert shipped.category_for_address(addr) is None
