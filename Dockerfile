# opkeeper's image: both processes (`opkeeper controller`, `opkeeper gateway`) and the
# `opkeeper apikey` command. Two stages: wheels are built with pip in the first, and the
# second holds only the installed package, as a non-root user, read-only friendly (the
# chart mounts /tmp and the call log volume; nothing else is written).
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN python -m venv /opt/opkeeper \
 && /opt/opkeeper/bin/pip install --no-cache-dir --disable-pip-version-check .

FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 opkeeper \
 && useradd --system --uid 10001 --gid opkeeper --home-dir /nonexistent --shell /usr/sbin/nologin opkeeper \
 && mkdir -p /var/lib/opkeeper && chown opkeeper:opkeeper /var/lib/opkeeper
COPY --from=build /opt/opkeeper /opt/opkeeper
ENV PATH=/opt/opkeeper/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
ENTRYPOINT ["opkeeper"]
CMD ["--help"]
