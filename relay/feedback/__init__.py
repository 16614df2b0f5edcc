"""Feedback: SES bounce, complaint and delivery events parsed, decided on by pure functions and
applied to the store; the SQS and SNS endpoints that bring them; the reputation guard."""
