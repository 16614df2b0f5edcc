"""The SES edge: the only code that talks to SES for sending, and the one place SES and HTTP
errors become the relay's own exceptions (map_ses_errors)."""
