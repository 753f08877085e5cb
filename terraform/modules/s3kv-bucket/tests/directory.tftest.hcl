# Offline tests of the S3 Express One Zone (directory bucket) option.

mock_provider "aws" {
  # IAM resources validate ARNs they are given; make mocked ARNs look real.
  mock_resource "aws_iam_policy" {
    defaults = {
      arn = "arn:aws:iam::123456789012:policy/mocked"
    }
  }

  mock_resource "aws_iam_role" {
    defaults = {
      arn = "arn:aws:iam::123456789012:role/mocked"
    }
  }

  mock_data "aws_partition" {
    defaults = {
      partition  = "aws"
      dns_suffix = "amazonaws.com"
    }
  }

  mock_data "aws_region" {
    defaults = {
      name = "us-east-1"
    }
  }

  mock_data "aws_caller_identity" {
    defaults = {
      account_id = "123456789012"
    }
  }
}

variables {
  bucket_name          = "s3kv-unit"
  bucket_type          = "directory"
  availability_zone_id = "use1-az4"
}

run "directory_bucket" {
  command = apply

  assert {
    condition = (
      aws_s3_directory_bucket.this[0].bucket == "s3kv-unit--use1-az4--x-s3" &&
      aws_s3_directory_bucket.this[0].location[0].name == "use1-az4" &&
      aws_s3_directory_bucket.this[0].data_redundancy == "SingleAvailabilityZone"
    )
    error_message = "The directory bucket must be named <base>--<az_id>--x-s3 in the given AZ."
  }

  assert {
    condition = (
      length(aws_s3_bucket.this) == 0 &&
      length(aws_s3_bucket_public_access_block.this) == 0 &&
      length(aws_s3_bucket_ownership_controls.this) == 0 &&
      length(aws_s3_bucket_server_side_encryption_configuration.this) == 0
    )
    error_message = "Directory buckets get no general-purpose-only resources (public access and ownership are fixed, SSE-S3 is the default)."
  }

  assert {
    condition = alltrue([
      for party in ["engine", "engine_readonly", "gc"] :
      tolist(flatten([for s in jsondecode(aws_iam_policy.this[party].policy).Statement : s.Action])) == tolist(["s3express:CreateSession"])
    ])
    error_message = "Directory-bucket policies must grant s3express:CreateSession only."
  }

  assert {
    condition = alltrue([
      for party in ["engine", "engine_readonly", "gc"] :
      jsondecode(aws_iam_policy.this[party].policy).Statement[0].Resource == ["arn:aws:s3express:us-east-1:123456789012:bucket/s3kv-unit--use1-az4--x-s3"]
    ])
    error_message = "CreateSession must be scoped to the directory bucket's s3express ARN."
  }

  assert {
    condition = {
      for party in ["engine", "engine_readonly", "gc"] :
      party => jsondecode(aws_iam_policy.this[party].policy).Statement[0].Condition.StringEquals["s3express:SessionMode"]
      } == {
      engine          = "ReadWrite"
      engine_readonly = "ReadOnly"
      gc              = "ReadWrite"
    }
    error_message = "Session modes must be ReadWrite for engine and GC and ReadOnly for the read-only engine."
  }

  assert {
    condition = length([
      for s in jsondecode(aws_s3_bucket_policy.this.policy).Statement : s
      if s.Effect == "Deny" && try(s.Condition.Bool["aws:SecureTransport"], "") == "false"
    ]) == 1
    error_message = "The directory bucket policy must deny requests without TLS."
  }

  assert {
    condition = length([
      for s in jsondecode(aws_s3_bucket_policy.this.policy).Statement : s
      if s.Effect == "Allow" && try(s.Principal.Service, "") == "lifecycle.s3.amazonaws.com" &&
      try(s.Condition.StringEquals["s3express:SessionMode"], "") == "ReadWrite" &&
      try(s.Condition.StringEquals["aws:SourceAccount"], "") == "123456789012"
    ]) == 1
    error_message = "S3 Lifecycle needs a ReadWrite session on directory buckets, limited to this account."
  }

  assert {
    condition = length([
      for r in aws_s3_bucket_lifecycle_configuration.this.rule : r
      if try(r.abort_incomplete_multipart_upload[0].days_after_initiation, 0) == 1
    ]) == 1
    error_message = "Directory buckets must also abort incomplete multipart uploads."
  }

  assert {
    condition     = jsondecode(output.kv_transfer_config).kv_connector_extra_config.bucket == "s3kv-unit--use1-az4--x-s3"
    error_message = "kv_transfer_config must carry the full directory bucket name."
  }

  assert {
    condition     = output.bucket_arn == "arn:aws:s3express:us-east-1:123456789012:bucket/s3kv-unit--use1-az4--x-s3"
    error_message = "bucket_arn must be the s3express ARN."
  }
}

run "directory_bucket_kms" {
  command = plan

  variables {
    kms_key_arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
  }

  assert {
    condition = (
      one(aws_s3_bucket_server_side_encryption_configuration.this[0].rule).apply_server_side_encryption_by_default[0].sse_algorithm == "aws:kms" &&
      one(aws_s3_bucket_server_side_encryption_configuration.this[0].rule).bucket_key_enabled == true
    )
    error_message = "SSE-KMS on a directory bucket needs bucket keys."
  }

  assert {
    condition = sort(flatten([
      for s in jsondecode(aws_iam_policy.this["engine"].policy).Statement : s.Action if s.Resource == [var.kms_key_arn]
    ])) == tolist(["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"])
    error_message = "The engine must be able to use the KMS key."
  }

  assert {
    condition = sort(flatten([
      for s in jsondecode(aws_iam_policy.this["engine_readonly"].policy).Statement : s.Action if s.Resource == [var.kms_key_arn]
    ])) == tolist(["kms:Decrypt"])
    error_message = "The read-only engine only needs kms:Decrypt."
  }
}
