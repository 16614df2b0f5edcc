"""Lanes as pure decisions: which lane a message joins, which lane sends next, the
X-SES-* headers as SendEmail options, and the [lanes] configuration."""

from __future__ import annotations

import json

import pytest

from relay.config import load
from relay.config_lanes import LaneConfig, LanesConfig, RuleConfig
from relay.delivery.lanes import LaneBook, LaneView, choose, quota_ok
from relay.errors import ConfigError
from relay.ingress.lanes import BadSesHeader, Facts, decide, header_fields, ses_options, strip
from relay.ses.client import send_email_body
from relay.spool.record import Envelope, Record, SesOptions

THREE = (LaneConfig("urgent", weight=6), LaneConfig("transactional", weight=3),
         LaneConfig("bulk", weight=1))
RULES = LanesConfig(lane=THREE, rule=(
    RuleConfig(lane="bulk", port=2526),
    RuleConfig(lane="urgent", user="auth-app"),
    RuleConfig(lane="bulk", sender="news.example.com"),
    RuleConfig(lane="urgent", sender="alerts@example.com"),
    RuleConfig(lane="bulk", network="10.9.0.0/16"),
    RuleConfig(lane="urgent", header="X-Priority: 1*"),
    RuleConfig(lane="urgent", header="X-Trusted-Reset", allow_raise=True),
    RuleConfig(lane="bulk", header="X-Campaign"),
))


def facts(port: int = 2525, user: str = "", client: str = "127.0.0.1",
          sender: str = "app@example.com", headers: str = "") -> Facts:
    data = (headers + "Subject: s\r\n\r\nbody\r\n").encode()
    return Facts(port=port, user=user, client=client, sender=sender,
                 headers=header_fields(data))


@pytest.mark.parametrize(("case", "expected"), [
    (facts(), "transactional"),
    (facts(headers="Precedence: bulk\r\n"), "bulk"),
    (facts(headers="Precedence: List\r\n"), "bulk"),
    (facts(headers="Precedence: junk\r\n"), "bulk"),
    (facts(headers="Precedence: first-class\r\n"), "transactional"),
    (facts(headers="List-Unsubscribe: <mailto:u@example.com>\r\n"), "bulk"),
    (facts(port=2526), "bulk"),
    (facts(user="auth-app"), "urgent"),
    (facts(sender="x@news.example.com"), "bulk"),
    (facts(sender="x@mail.news.example.com"), "bulk"),
    (facts(sender="x@othernews.example.com"), "transactional"),
    (facts(sender="Alerts@Example.com"), "urgent"),
    (facts(client="10.9.3.4"), "bulk"),
    (facts(client="10.8.3.4"), "transactional"),
    # first match wins: port 2526 is bulk even for the urgent user
    (facts(port=2526, user="auth-app"), "bulk"),
    # a header may move mail down...
    (facts(headers="X-Campaign: spring\r\n"), "bulk"),
    (facts(user="auth-app", headers="X-Campaign: spring\r\n"), "urgent"),  # user rule first
    # ...but not up, unless the rule allows it
    (facts(headers="X-Priority: 1 (Highest)\r\n"), "transactional"),
    (facts(port=2526, headers="X-Priority: 1\r\n"), "bulk"),
    (facts(headers="X-Trusted-Reset: yes\r\n"), "urgent"),
    # the built-in bulk marks never raise mail either
    (facts(user="auth-app", headers="Precedence: bulk\r\n"), "urgent"),
])
def test_lane_rules(case: Facts, expected: str) -> None:
    assert decide(RULES, case) == expected


def test_a_header_rule_does_not_raise_above_the_default_lane() -> None:
    cfg = LanesConfig(default="bulk", bulk_lane="", lane=THREE,
                      rule=(RuleConfig(lane="transactional", header="X-Kind: reset"),))
    assert decide(cfg, facts(headers="X-Kind: reset\r\n")) == "bulk"


def v(name: str, ready: bool = True, vtime: float = 0.0, free_at: float = 0.0,
      quota: bool = True) -> LaneView:
    return LaneView(name, ready=ready, vtime=vtime, free_at=free_at, quota_ok=quota)


@pytest.mark.parametrize(("lanes", "expected"), [
    ([], None),
    ([v("t", ready=False), v("b", ready=False)], None),
    ([v("t"), v("b")], "t"),  # a tie goes to the higher-priority lane
    ([v("t", vtime=2.0), v("b", vtime=1.0)], "b"),  # least service for its weight
    ([v("t", vtime=2.0), v("b", vtime=1.0, ready=False)], "t"),  # work-conserving
    ([v("t", vtime=0.0, free_at=10.5), v("b", vtime=9.0)], "b"),  # t's own cap
    ([v("t", vtime=0.0, free_at=10.0), v("b", vtime=9.0)], "t"),  # cap free at now
    ([v("t", vtime=5.0), v("b", vtime=1.0, quota=False)], "t"),  # b over its share
    ([v("t", ready=False), v("b", quota=False)], None),  # waits, nothing else to send
])
def test_choose(lanes: list[LaneView], expected: str | None) -> None:
    assert choose(lanes, now=10.0) == expected


def test_weights_9_to_1_share_the_rate_and_an_idle_lane_banks_nothing() -> None:
    book = LaneBook(LanesConfig())
    order = []
    for _ in range(100):
        views = [v(n, vtime=book.vtime[n]) for n in book.names]
        lane = choose(views, 0.0)
        assert lane is not None
        book.charge(lane, 1, 0.0)
        order.append(lane)
    assert order.count("transactional") == 90 and order.count("bulk") == 10
    # bulk alone for a while, then transactional wakes: level, not 900 calls of credit
    for _ in range(900):
        book.charge("bulk", 1, 0.0)
    book.woke("transactional", ["bulk"])
    assert book.vtime["transactional"] == book.vtime["bulk"]


@pytest.mark.parametrize(("share", "n", "remaining", "outstanding", "ok"), [
    (1.0, 1, 0.0, 0, True),  # no share: the account quota alone decides
    (0.9, 1, 11.0, 0, True),  # 100 a day: bulk leaves the last 10
    (0.9, 1, 10.0, 0, False),
    (0.9, 2, 11.0, 0, False),
    (0.9, 1, 12.0, 1, True),
    (0.9, 1, 12.0, 2, False),  # taken but not yet counted
])
def test_quota_share(share: float, n: int, remaining: float, outstanding: int,
                     ok: bool) -> None:
    assert quota_ok(share=share, n=n, remaining=remaining, max_24h=100.0,
                    outstanding=outstanding) is ok
    assert quota_ok(share=share, n=n, remaining=remaining, max_24h=-1.0,
                    outstanding=outstanding)  # unlimited account


HEAD = ("X-SES-CONFIGURATION-SET: msg-set\r\nX-SES-MESSAGE-TAGS: campaign=spring, "
        "kind=news\r\nX-SES-TENANT-NAME: tenant_1\r\n"
        "X-SES-LIST-MANAGEMENT-OPTIONS: weekly; topic=sports\r\n")


def test_x_ses_headers_become_options_over_the_lane_defaults() -> None:
    cfg = LanesConfig(lane=(LaneConfig("transactional"),
                            LaneConfig("bulk", configuration_set="bulk-set",
                                       tags=(("kind", "bulk"), ("lane", "bulk")),
                                       tenant="t0")))
    got = ses_options(cfg, "bulk", facts(headers=HEAD))
    assert got == SesOptions(configuration_set="msg-set",
                             tags=(("kind", "news"), ("lane", "bulk"), ("campaign", "spring")),
                             tenant="tenant_1", contact_list="weekly", topic="sports")
    assert ses_options(cfg, "bulk", facts()) == SesOptions(
        configuration_set="bulk-set", tags=(("kind", "bulk"), ("lane", "bulk")), tenant="t0")
    assert ses_options(cfg, "transactional", facts()) == SesOptions()


@pytest.mark.parametrize(("header", "name"), [
    ("X-SES-MESSAGE-TAGS: campaign=spring sale\r\n", "X-SES-MESSAGE-TAGS"),
    ("X-SES-MESSAGE-TAGS: campaign\r\n", "X-SES-MESSAGE-TAGS"),
    ("X-SES-MESSAGE-TAGS: c=" + "x" * 257 + "\r\n", "X-SES-MESSAGE-TAGS"),
    ("X-SES-MESSAGE-TAGS: caf\u00e9=1\r\n", "X-SES-MESSAGE-TAGS"),
    ("X-SES-CONFIGURATION-SET: my set\r\n", "X-SES-CONFIGURATION-SET"),
    ("X-SES-TENANT-NAME: \r\n", "X-SES-TENANT-NAME"),
    ("X-SES-LIST-MANAGEMENT-OPTIONS: weekly; subject=x\r\n", "X-SES-LIST-MANAGEMENT-OPTIONS"),
])
def test_a_malformed_x_ses_header_is_named(header: str, name: str) -> None:
    with pytest.raises(BadSesHeader) as err:
        ses_options(LanesConfig(), "transactional", facts(headers=header))
    assert err.value.header == name


def test_a_tag_of_256_characters_is_fine() -> None:
    got = ses_options(LanesConfig(), "transactional",
                      facts(headers="X-SES-MESSAGE-TAGS: c=" + "x" * 256 + "\r\n"))
    assert got.tags == (("c", "x" * 256),)


def test_strip_removes_only_the_parameter_headers() -> None:
    data = (f"From: a@example.com\r\n{HEAD}X-SES-Message-Tags: a=b,\r\n c=d\r\n"
            "X-SES-Other: kept\r\nSubject: s\r\n\r\nX-SES-TENANT-NAME: body\r\n").encode()
    assert strip(data) == (b"From: a@example.com\r\nX-SES-Other: kept\r\nSubject: s\r\n\r\n"
                           b"X-SES-TENANT-NAME: body\r\n")
    plain = b"Subject: s\r\n\r\nbody\r\n"
    assert strip(plain) is plain


def test_send_email_body_carries_the_options() -> None:
    opts = SesOptions(configuration_set="c", tags=(("a", "b"),), tenant="t",
                      contact_list="l", topic="p")
    doc = json.loads(send_email_body(sender="s@example.com", recipients=["r@example.net"],
                                     raw=b"x", configuration_set="default", options=opts))
    assert doc["ConfigurationSetName"] == "c"
    assert doc["EmailTags"] == [{"Name": "a", "Value": "b"}]
    assert doc["TenantName"] == "t"
    assert doc["ListManagementOptions"] == {"ContactListName": "l", "TopicName": "p"}
    bare = json.loads(send_email_body(sender="", recipients=["r@example.net"], raw=b"x",
                                      configuration_set="default"))
    assert bare["ConfigurationSetName"] == "default" and "EmailTags" not in bare


def test_send_email_body_is_valid_for_the_sesv2_model() -> None:
    """botocore's own SESv2 model validates the document the lean path builds."""
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model("sesv2")
    shape = model.operation_model("SendEmail").input_shape
    opts = SesOptions(configuration_set="c", tags=(("a", "b"),), tenant="t",
                      contact_list="l", topic="p")
    doc = json.loads(send_email_body(sender="s@example.com", recipients=["r@example.net"],
                                     raw=b"x", options=opts))
    doc["Content"]["Raw"]["Data"] = b"x"  # a blob to the model; base64 on the wire
    report = ParamValidator().validate(doc, shape)
    assert not report.has_errors(), report.generate_report()


def test_an_envelope_without_a_lane_reads_as_the_default_lane() -> None:
    old = {"id": "X", "sender": "a@example.com", "recipients": ["b@example.net"],
           "received_at": 1.0, "size": 1}
    rec = Record.from_json(json.dumps(old).encode())
    assert rec.envelope.lane == "transactional" and rec.envelope.ses == SesOptions()
    env = Envelope("a@example.com", ("b@example.net",), 1.0, lane="bulk",
                   ses=SesOptions(tags=(("a", "b"),), topic="t", contact_list="l"))
    again = Record.from_json(Record(id="Y", envelope=env, size=1).to_json())
    assert again.envelope == env


def test_lanes_config(tmp_path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("""
[lanes]
default = "apps"
[[lanes.lane]]
name = "apps"
weight = 6
[[lanes.lane]]
name = "bulk"
weight = 1
max_rate = 5
quota_share = 0.5
configuration_set = "news"
tags = ["kind=news"]
[[lanes.rule]]
lane = "bulk"
port = 2526
""")
    cfg = load(path, env={}).lanes
    assert cfg.names == ("apps", "bulk") and cfg.default == "apps"
    assert cfg.get("bulk") == LaneConfig("bulk", weight=1.0, max_rate=5.0, quota_share=0.5,
                                         configuration_set="news", tags=(("kind", "news"),))
    assert cfg.rule == (RuleConfig(lane="bulk", port=2526),)
    assert load(None, env={}).lanes.names == ("transactional", "bulk")


@pytest.mark.parametrize(("toml", "key"), [
    ('[[lanes.lane]]\nname = "a"\nweight = 0\n', "lanes.lane[0].weight"),
    ('[[lanes.lane]]\nname = "transactional"\n[[lanes.lane]]\nname = "bulk"\n'
     'quota_share = 1.5\n', "lanes.lane[1].quota_share"),
    ('[[lanes.lane]]\nname = "transactional"\ncolour = 1\n', "lanes.lane[0].colour"),
    ('[[lanes.lane]]\nname = "transactional"\n', "lanes.bulk_lane"),
    ('[[lanes.rule]]\nlane = "nope"\nport = 1\n', "lanes.rule[0].lane"),
    ('[[lanes.rule]]\nlane = "bulk"\nnetwork = "10.0.0.300/8"\n', "lanes.rule[0].network"),
    ('[[lanes.rule]]\nlane = "bulk"\n', "lanes.rule[0]"),
    ('[[lanes.lane]]\nname = "transactional"\ntags = ["a b=c"]\n', "lanes.lane[0].tags"),
    ('[lanes]\ndefault = "x"\n', "lanes.default"),
])
def test_bad_lanes_config_names_the_key(tmp_path, toml: str, key: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert err.value.key == key


def test_the_example_config_documents_every_lanes_key() -> None:
    import dataclasses
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "conf" / "relay.example.toml").read_text()
    body = text.split("[lanes]", 1)[1]
    documented = set(re.findall(r"^#?\s*([a-z_0-9]+)\s*=", body, re.M))
    for cls in (LanesConfig, LaneConfig, RuleConfig):
        fields = {f.name for f in dataclasses.fields(cls)} - {"lane", "rule"}
        assert fields <= documented, (cls.__name__, fields - documented)
