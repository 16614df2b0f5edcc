# relay in a container: SMTP on 2525, /healthz /readyz /metrics on 8025, the spool on a
# volume at /var/spool/relay. The README's "Running in a container" has the commands;
# tests/container/check.sh runs them.
#   docker build -t relay .
#   docker run -d --name relay --stop-timeout 40 -v relay-spool:/var/spool/relay \
#     -p 2525:2525 -e RELAY_SMTP__ALLOWED_NETWORKS=172.16.0.0/12 \
#     -e RELAY_SES__REGION=eu-west-1 relay
# Clients that come through a published port are not loopback: admit their network
# (smtp.allowed_networks) or they get 554 5.7.1. --stop-timeout 40: the relay gives
# in-flight SES calls delivery.shutdown_timeout (30 s) after SIGTERM, plus 2 s for SMTP
# sessions; Docker's default of 10 s would cut a slow call with SIGKILL.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/relay/bin:$PATH

# Dependencies in a layer of their own, pinned by constraints.txt: a change to the relay's
# code reuses it. Only pyproject.toml's dependency list is read here, not the source.
COPY constraints.txt pyproject.toml /tmp/build/
RUN python3 -m venv /opt/relay \
 && python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/build/pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/build/requirements.txt \
 && pip install -q -c /tmp/build/constraints.txt -r /tmp/build/requirements.txt 'setuptools>=68' \
 && rm -rf /tmp/build

# A numeric user with a group of its own (Kubernetes runAsNonRoot needs the number). The
# spool is owned by the user and group 0, group-writable and setgid, so that an arbitrary
# uid in group 0 (OpenShift) or an fsGroup can write it too. HOME is not the spool.
RUN groupadd --gid 10001 relay \
 && useradd --uid 10001 --gid 10001 --home-dir /home/relay --no-create-home \
      --shell /usr/sbin/nologin relay \
 && install -d -o 10001 -g 0 -m 2775 /var/spool/relay \
 && install -d -o 10001 -g 0 -m 0775 /home/relay \
 && install -d -m 0755 /etc/relay /usr/share/relay

COPY pyproject.toml README.md /tmp/build/
COPY relay /tmp/build/relay
RUN pip install -q --no-deps --no-build-isolation /tmp/build && rm -rf /tmp/build \
 && ln -s /opt/relay/bin/relay /usr/sbin/sendmail
COPY conf /usr/share/relay/conf
COPY deploy/container/relay.toml /etc/relay/relay.toml
COPY deploy/container/entrypoint.sh /usr/local/bin/relay-entrypoint
COPY deploy/container/healthcheck.py /usr/local/bin/relay-healthcheck

# What belongs to the container, whichever config file is mounted (these variables
# override the file's keys): listen on the container's network, the spool and the
# sandbox's mail on the volume, the config at /etc/relay/relay.toml.
ENV RELAY_CONFIG=/etc/relay/relay.toml \
    RELAY_SMTP__HOST=0.0.0.0 \
    RELAY_ADMIN__HOST=0.0.0.0 \
    RELAY_SPOOL__DIR=/var/spool/relay \
    RELAY_SANDBOX__DIR=/var/spool/relay/sandbox-mail \
    HOME=/home/relay

# No VOLUME: an anonymous volume made when -v is forgotten dies with `docker run --rm`, and
# acknowledged mail with it. The entrypoint refuses to serve from a spool that is not a
# volume (RELAY_ALLOW_EPHEMERAL_SPOOL=1 accepts that).
WORKDIR /var/spool/relay
USER 10001:10001
EXPOSE 2525 8025
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["relay-healthcheck"]
ENTRYPOINT ["relay-entrypoint"]
CMD ["serve"]

# Last, so that a new revision or date does not invalidate the layers above.
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="relay" \
      org.opencontainers.image.description="A durable SMTP relay for Amazon SES: spool to disk, send at the account's rate, honour bounces." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
