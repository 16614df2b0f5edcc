"""Ingress: the SMTP front door. Accepts mail from allowed or authenticated clients, applies the
address and header rules, and makes each message durable in the spool before it answers 250."""
