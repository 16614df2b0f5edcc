"""The console: server-rendered HTML pages on the admin listener (overview, queue, log,
suppressions, sandbox mail). Views are pure functions of plain values (relay.ops.console.
views_*), data comes through relay.spool and relay.store (relay.ops.console.data), and
relay.ops.console.app wires the routes, CSRF, login and security headers into the admin
aiohttp application.
"""
