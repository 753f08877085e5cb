data "aws_partition" "current" {}

data "aws_region" "current" {}

# The account ID is only part of directory-bucket (s3express) ARNs.
data "aws_caller_identity" "current" {
  count = local.is_directory ? 1 : 0
}

locals {
  is_directory = var.bucket_type == "directory"
  partition    = data.aws_partition.current.partition
  region       = data.aws_region.current.name
  account_id   = local.is_directory ? data.aws_caller_identity.current[0].account_id : null

  # Name of the bucket as known from configuration (known at plan time).
  bucket_name = local.is_directory ? "${var.bucket_name}--${coalesce(var.availability_zone_id, "unset")}--x-s3" : var.bucket_name

  # The created bucket; referencing the resource orders everything after it.
  bucket = local.is_directory ? aws_s3_directory_bucket.this[0].bucket : aws_s3_bucket.this[0].bucket

  # ARNs are built rather than read from the resources so that they are known
  # at plan time and the policy documents are fully reviewable in a plan.
  bucket_arn = (
    local.is_directory
    ? "arn:${local.partition}:s3express:${local.region}:${local.account_id}:bucket/${local.bucket}"
    : "arn:${local.partition}:s3:::${local.bucket}"
  )
  objects_arn = "${local.bucket_arn}/${var.prefix}/*"

  lifecycle_rules = concat(
    [
      {
        id                                     = "abort-incomplete-multipart-uploads"
        prefix                                 = null
        abort_incomplete_multipart_upload_days = var.abort_incomplete_multipart_upload_days
        expiration_days                        = null
      },
    ],
    var.expire_after_days == null ? [] : [
      {
        id                                     = "expire-s3kv-cache"
        prefix                                 = "${var.prefix}/"
        abort_incomplete_multipart_upload_days = null
        expiration_days                        = var.expire_after_days
      },
    ],
  )

  # Bucket policy, general-purpose bucket: TLS only, TLS >= 1.2.
  general_purpose_bucket_policy = {
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "DenyInsecureTransport"
        Effect    = "Deny"
        Principal = "*"
        Action    = ["s3:*"]
        Resource  = [local.bucket_arn, "${local.bucket_arn}/*"]
        Condition = {
          Bool = { "aws:SecureTransport" = "false" }
        }
      },
      {
        Sid       = "DenyOutdatedTls"
        Effect    = "Deny"
        Principal = "*"
        Action    = ["s3:*"]
        Resource  = [local.bucket_arn, "${local.bucket_arn}/*"]
        Condition = {
          NumericLessThan = { "s3:TlsVersion" = "1.2" }
        }
      },
    ]
  }

  # Bucket policy, directory bucket: TLS only, and the ReadWrite session that
  # S3 Lifecycle needs to expire objects and abort uploads in a directory bucket.
  directory_bucket_policy = {
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "DenyInsecureTransport"
        Effect    = "Deny"
        Principal = "*"
        Action    = ["s3express:*"]
        Resource  = [local.bucket_arn]
        Condition = {
          Bool = { "aws:SecureTransport" = "false" }
        }
      },
      {
        Sid       = "AllowS3LifecycleSessions"
        Effect    = "Allow"
        Principal = { Service = "lifecycle.s3.amazonaws.com" }
        Action    = ["s3express:CreateSession"]
        Resource  = [local.bucket_arn]
        Condition = {
          StringEquals = {
            "s3express:SessionMode" = "ReadWrite"
            "aws:SourceAccount"     = local.account_id
          }
        }
      },
    ]
  }
}

# ---------------------------------------------------------------------------
# General-purpose bucket
# ---------------------------------------------------------------------------

resource "aws_s3_bucket" "this" {
  count = local.is_directory ? 0 : 1

  bucket        = var.bucket_name
  force_destroy = var.force_destroy
  tags          = var.tags

  # No aws_s3_bucket_versioning on purpose: this is a cache, versioning stays
  # off (never enabled) so that deletes and overwrites really free storage.
}

resource "aws_s3_bucket_public_access_block" "this" {
  count = local.is_directory ? 0 : 1

  bucket                  = aws_s3_bucket.this[0].id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "this" {
  count = local.is_directory ? 0 : 1

  bucket = aws_s3_bucket.this[0].id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  # Directory buckets default to SSE-S3; configure them only for SSE-KMS.
  count = !local.is_directory || var.kms_key_arn != null ? 1 : 0

  bucket = local.bucket

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = var.kms_key_arn == null ? "AES256" : "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    bucket_key_enabled = var.kms_key_arn != null
  }
}

resource "aws_s3_bucket_policy" "this" {
  bucket = local.bucket
  policy = local.is_directory ? jsonencode(local.directory_bucket_policy) : jsonencode(local.general_purpose_bucket_policy)

  # Put the public access block in place before any policy.
  depends_on = [aws_s3_bucket_public_access_block.this]
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  bucket = local.bucket

  dynamic "rule" {
    for_each = local.lifecycle_rules

    content {
      id     = rule.value.id
      status = "Enabled"

      filter {
        prefix = rule.value.prefix
      }

      dynamic "abort_incomplete_multipart_upload" {
        for_each = rule.value.abort_incomplete_multipart_upload_days == null ? [] : [rule.value.abort_incomplete_multipart_upload_days]

        content {
          days_after_initiation = abort_incomplete_multipart_upload.value
        }
      }

      dynamic "expiration" {
        for_each = rule.value.expiration_days == null ? [] : [rule.value.expiration_days]

        content {
          days = expiration.value
        }
      }
    }
  }

  # The bucket policy grants S3 Lifecycle its session on directory buckets.
  depends_on = [aws_s3_bucket_policy.this]
}

# ---------------------------------------------------------------------------
# S3 Express One Zone directory bucket
# ---------------------------------------------------------------------------

resource "aws_s3_directory_bucket" "this" {
  count = local.is_directory ? 1 : 0

  bucket          = local.bucket_name
  data_redundancy = "SingleAvailabilityZone"
  type            = "Directory"
  force_destroy   = var.force_destroy

  location {
    name = var.availability_zone_id
    type = "AvailabilityZone"
  }

  lifecycle {
    precondition {
      condition     = var.availability_zone_id != null
      error_message = "availability_zone_id is required when bucket_type = \"directory\"."
    }
    precondition {
      condition     = length(local.bucket_name) <= 63
      error_message = "The directory bucket name \"<bucket_name>--<availability_zone_id>--x-s3\" must be at most 63 characters; shorten bucket_name."
    }
  }
}
