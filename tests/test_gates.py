import pytest

from stages.lib.gates import Gate, check_gates, parse_gate

REPORT = {
    "base": {"json_valid": 0.05, "general_accuracy": 0.8, "field_accuracy": {"category": 0.1}},
    "tuned": {"json_valid": 0.62, "general_accuracy": 0.7, "field_accuracy": {"category": 0.9}},
    "delta": {"json_valid": 0.57, "general_accuracy": -0.1, "field_accuracy": {"category": 0.8}},
    "n": {"test": 60, "probes": 20},
}


def test_parse_gate():
    assert parse_gate("tuned.json_valid >= 0.9") == Gate("tuned.json_valid", ">=", 0.9)
    assert parse_gate("delta.general_accuracy>-0.05") == Gate("delta.general_accuracy", ">", -0.05)
    with pytest.raises(ValueError, match="is not of the form"):
        parse_gate("tuned.json_valid is high")


def test_passing_gates():
    gates = ["tuned.json_valid >= 0.6", "delta.json_valid > 0", "tuned.field_accuracy.category >= 0.9",
             "n.test >= 50", "base.json_valid < 0.1", "delta.general_accuracy <= 0"]
    assert check_gates(gates, REPORT) == []


def test_failing_gate_names_metric_and_both_values():
    [message] = check_gates(["tuned.json_valid >= 0.9"], REPORT)
    assert message == "gate 'tuned.json_valid >= 0.9' failed: tuned.json_valid = 0.62 (base 0.05, delta 0.57)"
    [message] = check_gates(["delta.general_accuracy >= -0.05"], REPORT)
    assert "delta.general_accuracy = -0.1" in message and "base 0.8" in message and "tuned 0.7" in message


def test_every_failure_is_reported():
    failures = check_gates(["tuned.json_valid >= 0.9", "tuned.json_valid >= 0.1",
                            "delta.general_accuracy >= 0"], REPORT)
    assert len(failures) == 2


def test_unknown_metric_is_a_failure_with_the_known_names():
    [message] = check_gates(["tuned.json_vaild >= 0.9"], REPORT)
    assert "metric 'tuned.json_vaild' not in reports/eval.json" in message
    assert "did you mean 'tuned.json_valid'?" in message
    assert "known: " in message and "delta.general_accuracy" in message
    # Not configured (absent from the report) fails too: an uncheckable gate protects nothing.
    [message] = check_gates(["tuned.schema_valid >= 0.9"], REPORT)
    assert "not in reports/eval.json" in message


def test_non_numeric_and_malformed_gates():
    [message] = check_gates(["tuned.field_accuracy >= 0.5"], REPORT)
    assert "is not a number" in message
    [message] = check_gates(["nonsense"], REPORT)
    assert "is not of the form" in message
    assert check_gates([], REPORT) == []
