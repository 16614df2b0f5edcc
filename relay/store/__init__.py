"""The database: models and migrations, the suppression list, the message log, the feedback
event ledger and the shared rate budget. Each table has one writer, named in its module."""
