"""`indexcache-operator`'s command line: every option takes effect, also from the environment the chart sets,
and a bad value stops it naming the option (issue 19 item 10: operator.args and INDEXCACHE_LOG_FORMAT
were silently ignored)."""
import json
import logging
import subprocess
import sys

import pytest

from indexcache_operator.__main__ import configure_logging, parse


def test_options_from_arguments_then_environment():
    o = parse(["-n", "team-a", "--namespace", "team-b", "--peering", "p", "-v", "--log-format", "json"], {})
    assert (o.namespaces, o.peering, o.log_level, o.log_format) == (("team-a", "team-b"), "p", "DEBUG", "json")
    env = {"INDEXCACHE_OPERATOR_NAMESPACES": "a,b", "INDEXCACHE_OPERATOR_PEERING": "ha",
           "INDEXCACHE_LOG_FORMAT": "JSON", "INDEXCACHE_OPERATOR_LOG_LEVEL": "warning"}
    o = parse([], env)
    assert (o.namespaces, o.peering, o.log_level, o.log_format) == (("a", "b"), "ha", "WARNING", "json")
    o = parse(["--standalone", "-A", "-q"], env)  # the command line wins
    assert (o.namespaces, o.peering, o.log_level) == ((), None, "WARNING")
    assert parse([], {}) == parse(["--log-format", "text"], {})


@pytest.mark.parametrize("argv,env,named", [
    (["--log-format", "xml"], {}, "--log-format"),
    ([], {"INDEXCACHE_LOG_FORMAT": "xml"}, "INDEXCACHE_LOG_FORMAT"),
    ([], {"INDEXCACHE_OPERATOR_LOG_LEVEL": "loud"}, "INDEXCACHE_OPERATOR_LOG_LEVEL"),
    (["--peering", "p", "--standalone"], {}, "--standalone"),
    (["--verbose-ish"], {}, "--verbose-ish"),
])
def test_bad_options_stop_it_naming_them(argv, env, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(argv, env)
    assert exit_.value.code == 2 and named in capsys.readouterr().err


def test_json_log_format_writes_one_json_object_per_line(capfd):
    configure_logging(parse(["--log-format", "json"], {}))
    try:
        logging.getLogger("indexcache_operator.reconcile").warning("reconcile of %s failed", "ns/chat")
        record = json.loads(capfd.readouterr().err.strip().splitlines()[-1])
        assert record["message"] == "reconcile of ns/chat failed" and record["severity"] == "warn"
    finally:
        configure_logging(parse([], {}))


def test_the_console_script_answers_help():
    out = subprocess.run([sys.executable, "-m", "indexcache_operator", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--peering" in out.stdout and "--log-format" in out.stdout
