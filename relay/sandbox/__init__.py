"""The embedded SES-compatible sandbox (ses.endpoint_url = "sandbox") and its mailbox
simulator: the whole pipeline with no AWS account, and the fault injection the tests use."""
