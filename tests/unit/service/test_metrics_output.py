"""The Prometheus text exposition (``render_prometheus``) as a scraper parses it.

What users rely on: any forward or agent name (they are free text in the config)
yields a line a Prometheus parser accepts, and each metric is introduced by one
HELP and one TYPE line followed by all its samples, in one group (strict parsers
reject a metric whose lines are interleaved with another's).
"""

from __future__ import annotations

from wstunnel import mux
from wstunnel.service.metrics import TunnelStats
from wstunnel.service.metrics_output import METRICS, render_prometheus


def test_label_values_are_escaped_and_numbers_written_as_prometheus_reads_them() -> None:
    """A backslash, a double quote and a newline in a label value are escaped (\\\\,
    \\", \\n: the exposition format's rules); whole numbers have no ".0", fractions
    keep their digits."""
    stats = TunnelStats("agent")
    name = 'db "main"\\eu\nwest'
    stats.forward_channels[name] += 3
    stats.forward_buckets[name, "up"] = mux.TokenBucket(1.5)
    text = render_prometheus(stats)
    label = 'forward="db \\"main\\"\\\\eu\\nwest"'
    assert f"wstunnel_forward_channels_total{{{label}}} 3\n" in text
    assert f'wstunnel_forward_rate_limit_bytes{{{label},direction="up"}} 1.5\n' in text
    assert "\nwest" not in text  # (a raw newline would end the sample line)


def test_each_metric_is_one_group_after_its_help_and_type_lines() -> None:
    """Every series is a name of METRICS, introduced once by its HELP and TYPE and
    followed by all its samples, also where two forwards and two agents each
    have a pair of metrics (which the samples yield side by side)."""
    stats = TunnelStats("relay")
    for forward in ("a", "b"):
        stats.forward_channels[forward] += 1
        stats.forward_buckets[forward, "up"] = mux.TokenBucket(1000)
        stats.agent_buckets[f"agent-{forward}", "up"] = mux.TokenBucket(1000)
    introduced: list[str] = []
    for line in render_prometheus(stats).splitlines():
        if line.startswith("# HELP "):
            introduced.append(line.split()[2])
        elif line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert (name, kind) == (introduced[-1], METRICS[name][0])
        else:
            assert line.split("{")[0].split()[0] == introduced[-1], line
    assert len(introduced) == len(set(introduced))
    assert set(introduced) <= set(METRICS)
    assert {"wstunnel_forward_channels_open", "wstunnel_agent_rate_limit_bytes",
            "wstunnel_forward_throttled_seconds_total"} <= set(introduced)
