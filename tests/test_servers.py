"""The moto S3 fixture really serves S3 on loopback through boto3's endpoint_url."""

import boto3


def test_moto_s3_roundtrip(s3_bucket, moto_server):
    assert moto_server.startswith("http://127.0.0.1:")
    s3 = boto3.client("s3")  # endpoint from AWS_ENDPOINT_URL_S3
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"v")
    assert s3.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"v"
