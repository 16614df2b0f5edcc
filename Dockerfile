# relay as a sidecar: apps in the same pod/network send SMTP to port 2525.
#   docker build -t relay .
#   docker run -v relay-spool:/var/spool/relay -e RELAY_SES__REGION=eu-west-1 -p 2525:2525 relay
# Configure with RELAY_<SECTION>__<KEY> variables or mount a file and point RELAY_CONFIG at it.
#
# Sidecar next to every app instance, all sharing one SES account through one PostgreSQL
# database (suppression list, message log, send rate; see conf/sidecar.toml):
#   docker run -v relay-spool-$INSTANCE:/var/spool/relay \
#     -e RELAY_CONFIG=/app/conf/sidecar.toml \
#     -e RELAY_DATABASE__URL=postgresql://relay:secret@db.internal:5432/relay \
#     -e RELAY_SES__REGION=eu-west-1 -e RELAY_FEEDBACK__SQS_QUEUE_URL=https://sqs... relay
# Each sidecar needs its own spool volume; only the database is shared.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RELAY_SMTP__HOST=0.0.0.0 \
    RELAY_ADMIN__HOST=0.0.0.0 \
    RELAY_SPOOL__DIR=/var/spool/relay

WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY relay ./relay
COPY conf ./conf
RUN pip install -c constraints.txt . \
 && useradd --system --uid 10001 --home-dir /var/spool/relay --shell /usr/sbin/nologin relay \
 && mkdir -p /var/spool/relay /etc/relay \
 && chown relay:relay /var/spool/relay

# The spool must outlive the container: acknowledged mail lives here until SES takes it.
VOLUME ["/var/spool/relay"]
USER relay
EXPOSE 2525 8025
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8025/healthz', timeout=2)" || exit 1
ENTRYPOINT ["relay"]
CMD ["serve"]
