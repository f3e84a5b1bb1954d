# One image for every role of "One study on many machines" (README): tune workers, grid, main.
# Build from the repository's root: docker build -t resnet50-pipeline .
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
RUN pip install --no-cache-dir ".[cpu,postgres]"
# Images come from a mounted volume; the feature cache stays inside the container.
ENV PIPELINE_DATA_DIR=/data PIPELINE_CACHE_DIR=/cache TF_CPP_MIN_LOG_LEVEL=1
ENTRYPOINT ["python", "-m", "pipeline"]
CMD ["--help"]
