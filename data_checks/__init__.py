"""Great Expectations suites for tunepipe data and the reports they produce."""
