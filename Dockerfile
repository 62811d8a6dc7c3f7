# The proxy image. Engines (vLLM) run in their own containers or hosts; the proxy only talks HTTP
# to them, so this image carries no vLLM. Build: docker build -t frugal .
# Run:   docker run -p 8000:8000 -v $PWD/frugal.yaml:/etc/frugal/frugal.yaml \
#          -v $PWD/policies:/etc/frugal/policies -e VLLM_API_KEY -e REDIS_PASSWORD frugal
# Secrets stay out of the mounted file: its values may read `${VLLM_API_KEY}` and the like
# from the container's environment (README, "Running it in front of your own engines").
# A stop (SIGTERM) may take server.drain_delay_s + server.shutdown_timeout_s (20 s by default):
# give `docker run` a --stop-timeout (compose: stop_grace_period) above it, as docker kills after
# 10 s, and the cache's queued writes are lost with a kill (README, "Stopping").
# The full image builds (it has gcc and the Python headers); the slim one runs.
FROM python:3.11 AS build
# EXTRAS=ml adds the MiniLM embedder (semantic cache, difficulty router); without it the proxy
# runs exact-cache-only with the cheap-feature router.
ARG EXTRAS=ml
# 1: the request path's modules compiled with mypyc (setup.py), about 10-30% less CPU
# per request, depending on the host (docs/benchmarks.md); 0: plain Python, a faster build.
ARG FRUGAL_COMPILE=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
RUN python -m venv /opt/frugal \
 && FRUGAL_COMPILE=${FRUGAL_COMPILE} /opt/frugal/bin/pip install --no-cache-dir ".[${EXTRAS}]"

FROM python:3.11-slim
RUN useradd --system --home /var/lib/frugal --create-home frugal
COPY --from=build /opt/frugal /opt/frugal
ENV PATH=/opt/frugal/bin:$PATH \
    FRUGAL_DATA_DIR=/var/lib/frugal \
    HF_HUB_OFFLINE=1
USER frugal
EXPOSE 8000
# Liveness, so /healthz: it stays 200 through the stop's drain, while /readyz (503 then, and while
# no engine can answer) is for what routes traffic here.
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
ENTRYPOINT ["frugal"]
CMD ["serve", "--config", "/etc/frugal/frugal.yaml"]
