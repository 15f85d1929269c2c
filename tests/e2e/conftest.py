"""Prints the compose end-to-end test's summary line after the test session (output is captured until then)."""


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    line = getattr(config, "hive_e2e_summary", None)
    if line:
        terminalreporter.write_line(line)
