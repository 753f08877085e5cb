# Least-privilege identity policies for the three parties that use the cache:
#
#   engine           vLLM workers: read and write KV blocks, never delete.
#   engine_readonly  vLLM workers that only consume blocks written by others.
#   gc               the garbage collector: read, list, delete, abort uploads.
#
# Policies are built with jsonencode() so that plans and tests can decode them.

locals {
  iam_name_prefix = coalesce(var.iam_name_prefix, "s3kv-${var.bucket_name}")

  # s3:prefix values that ListObjectsV2 may use: the prefix itself and anything
  # below "<prefix>/".
  list_prefixes = [var.prefix, "${var.prefix}/", "${var.prefix}/*"]

  list_cache_prefix_statement = {
    Sid      = "ListCachePrefix"
    Effect   = "Allow"
    Action   = ["s3:ListBucket"]
    Resource = [local.bucket_arn]
    Condition = {
      StringLike = { "s3:prefix" = local.list_prefixes }
    }
  }

  # SSE-KMS: S3 calls KMS on the caller's behalf. On general-purpose buckets
  # the key may only be used through S3 in this region (kms:ViaService).
  kms_condition = {
    for key, value in {
      Condition = {
        StringEquals = { "kms:ViaService" = "s3.${local.region}.amazonaws.com" }
      }
    } : key => value if !local.is_directory
  }
  kms_write_statements = var.kms_key_arn == null ? [] : [
    merge({
      Sid      = "UseCacheKmsKey"
      Effect   = "Allow"
      Action   = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"]
      Resource = [var.kms_key_arn]
    }, local.kms_condition),
  ]
  kms_read_statements = var.kms_key_arn == null ? [] : [
    merge({
      Sid      = "DecryptWithCacheKmsKey"
      Effect   = "Allow"
      Action   = ["kms:Decrypt"]
      Resource = [var.kms_key_arn]
    }, local.kms_condition),
  ]

  general_purpose_statements = {
    engine = concat(
      [
        local.list_cache_prefix_statement,
        {
          Sid    = "ReadWriteCacheObjects"
          Effect = "Allow"
          Action = [
            "s3:AbortMultipartUpload",
            "s3:GetObject",
            "s3:ListMultipartUploadParts",
            "s3:PutObject",
          ]
          Resource = [local.objects_arn]
        },
      ],
      local.kms_write_statements,
    )

    engine_readonly = concat(
      [
        local.list_cache_prefix_statement,
        {
          Sid      = "ReadCacheObjects"
          Effect   = "Allow"
          Action   = ["s3:GetObject"]
          Resource = [local.objects_arn]
        },
      ],
      local.kms_read_statements,
    )

    gc = concat(
      [
        local.list_cache_prefix_statement,
        {
          # ListBucketMultipartUploads has no s3:prefix condition key; it only
          # lists upload metadata, the objects themselves stay prefix-scoped.
          Sid      = "ListMultipartUploads"
          Effect   = "Allow"
          Action   = ["s3:ListBucketMultipartUploads"]
          Resource = [local.bucket_arn]
        },
        {
          Sid    = "CollectCacheObjects"
          Effect = "Allow"
          Action = [
            "s3:AbortMultipartUpload",
            "s3:DeleteObject",
            "s3:GetObject",
          ]
          Resource = [local.objects_arn]
        },
      ],
      local.kms_read_statements,
    )
  }

  # Directory buckets are authorised per bucket: a CreateSession grant covers
  # every key, and the session mode is the only knob (ReadOnly or ReadWrite).
  directory_session_modes = {
    engine          = "ReadWrite"
    engine_readonly = "ReadOnly"
    gc              = "ReadWrite"
  }

  directory_statements = {
    for party, mode in local.directory_session_modes : party => concat(
      [
        {
          Sid      = mode == "ReadOnly" ? "ReadOnlySession" : "ReadWriteSession"
          Effect   = "Allow"
          Action   = ["s3express:CreateSession"]
          Resource = [local.bucket_arn]
          Condition = {
            StringEquals = { "s3express:SessionMode" = mode }
          }
        },
      ],
      mode == "ReadOnly" ? local.kms_read_statements : local.kms_write_statements,
    )
  }

  party_descriptions = {
    engine          = "s3kv engine: read and write KV blocks"
    engine_readonly = "s3kv engine (read-only): read KV blocks"
    gc              = "s3kv garbage collector: read, list and delete KV blocks"
  }

  policy_documents = {
    for party, description in local.party_descriptions : party => (
      local.is_directory
      ? jsonencode({ Version = "2012-10-17", Statement = local.directory_statements[party] })
      : jsonencode({ Version = "2012-10-17", Statement = local.general_purpose_statements[party] })
    )
  }

  roles = { for party, role in var.roles : party => role if role != null }

  assume_role_policies = {
    for party, role in local.roles : party => coalesce(role.assume_role_policy, jsonencode({
      Version = "2012-10-17"
      Statement = concat(
        length(role.trusted_principal_arns) == 0 ? [] : [
          {
            Sid       = "TrustedPrincipals"
            Effect    = "Allow"
            Action    = ["sts:AssumeRole"]
            Principal = { AWS = role.trusted_principal_arns }
          },
        ],
        length(role.trusted_services) == 0 ? [] : [
          {
            Sid       = "TrustedServices"
            Effect    = "Allow"
            Action    = ["sts:AssumeRole"]
            Principal = { Service = role.trusted_services }
          },
        ],
      )
    }))
  }
}

resource "aws_iam_policy" "this" {
  for_each = local.policy_documents

  name        = "${local.iam_name_prefix}-${replace(each.key, "_", "-")}"
  path        = var.iam_path
  description = "${local.party_descriptions[each.key]} in ${local.bucket_name} under ${var.prefix}/"
  policy      = each.value
  tags        = var.tags
}

resource "aws_iam_role" "this" {
  for_each = local.roles

  name                 = coalesce(each.value.name, "${local.iam_name_prefix}-${replace(each.key, "_", "-")}")
  path                 = var.iam_path
  description          = local.party_descriptions[each.key]
  assume_role_policy   = local.assume_role_policies[each.key]
  max_session_duration = each.value.max_session_duration
  permissions_boundary = each.value.permissions_boundary
  tags                 = var.tags

  lifecycle {
    precondition {
      condition     = length(coalesce(each.value.name, "${local.iam_name_prefix}-${replace(each.key, "_", "-")}")) <= 64
      error_message = "IAM role names are limited to 64 characters: set iam_name_prefix or roles.<party>.name."
    }
  }
}

resource "aws_iam_role_policy_attachment" "this" {
  for_each = local.roles

  role       = aws_iam_role.this[each.key].name
  policy_arn = aws_iam_policy.this[each.key].arn
}
