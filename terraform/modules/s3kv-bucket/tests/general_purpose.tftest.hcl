# Offline tests of the general-purpose bucket: no AWS account or network.
# Run from the module directory: terraform init && terraform test

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
  bucket_name = "s3kv-unit-test"
}

run "secure_defaults" {
  command = apply

  # --- bucket hardening ----------------------------------------------------

  assert {
    condition = (
      aws_s3_bucket_public_access_block.this[0].block_public_acls == true &&
      aws_s3_bucket_public_access_block.this[0].block_public_policy == true &&
      aws_s3_bucket_public_access_block.this[0].ignore_public_acls == true &&
      aws_s3_bucket_public_access_block.this[0].restrict_public_buckets == true
    )
    error_message = "All four public access block settings must be true."
  }

  assert {
    condition     = aws_s3_bucket_ownership_controls.this[0].rule[0].object_ownership == "BucketOwnerEnforced"
    error_message = "Object ownership must be BucketOwnerEnforced (ACLs disabled)."
  }

  assert {
    condition     = one(aws_s3_bucket_server_side_encryption_configuration.this[0].rule).apply_server_side_encryption_by_default[0].sse_algorithm == "AES256"
    error_message = "Default encryption must be SSE-S3 when no KMS key is given."
  }

  assert {
    condition = length([
      for s in jsondecode(aws_s3_bucket_policy.this.policy).Statement : s
      if s.Effect == "Deny" && s.Principal == "*" && contains(s.Action, "s3:*") &&
      try(s.Condition.Bool["aws:SecureTransport"], "") == "false"
    ]) == 1
    error_message = "The bucket policy must deny requests without TLS (aws:SecureTransport = false)."
  }

  assert {
    condition = alltrue([
      for s in jsondecode(aws_s3_bucket_policy.this.policy).Statement : s.Effect == "Deny"
    ])
    error_message = "The bucket policy must only deny, never grant."
  }

  assert {
    condition     = aws_s3_bucket.this[0].force_destroy == false
    error_message = "force_destroy must default to false."
  }

  # --- lifecycle -------------------------------------------------------------

  assert {
    condition = length([
      for r in aws_s3_bucket_lifecycle_configuration.this.rule : r
      if r.status == "Enabled" && length(r.abort_incomplete_multipart_upload) == 1 &&
      try(r.abort_incomplete_multipart_upload[0].days_after_initiation, 0) == 1
    ]) == 1
    error_message = "A lifecycle rule must abort incomplete multipart uploads after 1 day."
  }

  assert {
    condition     = alltrue([for r in aws_s3_bucket_lifecycle_configuration.this.rule : length(r.expiration) == 0])
    error_message = "Objects must not expire unless expire_after_days is set."
  }

  # --- IAM: engine -----------------------------------------------------------

  assert {
    condition = alltrue([
      for action in flatten([for s in jsondecode(aws_iam_policy.this["engine"].policy).Statement : s.Action]) :
      !startswith(action, "s3:Delete") && !strcontains(action, "*")
    ])
    error_message = "The engine policy must not allow s3:DeleteObject, s3:Delete* or any wildcard action."
  }

  assert {
    condition = length(setsubtract(
      ["s3:GetObject", "s3:PutObject", "s3:ListBucket", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
      flatten([for s in jsondecode(aws_iam_policy.this["engine"].policy).Statement : s.Action]),
    )) == 0
    error_message = "The engine policy must allow get, put, list, abort and list-parts."
  }

  assert {
    condition = alltrue([
      for s in jsondecode(aws_iam_policy.this["engine"].policy).Statement :
      s.Resource == (contains(s.Action, "s3:ListBucket") ? ["arn:aws:s3:::s3kv-unit-test"] : ["arn:aws:s3:::s3kv-unit-test/s3kv/*"])
    ])
    error_message = "Engine object access must be scoped to arn:aws:s3:::<bucket>/<prefix>/*."
  }

  assert {
    condition = one([
      for s in jsondecode(aws_iam_policy.this["engine"].policy).Statement :
      s.Condition.StringLike["s3:prefix"] if contains(s.Action, "s3:ListBucket")
    ]) == ["s3kv", "s3kv/", "s3kv/*"]
    error_message = "s3:ListBucket must be restricted to the cache prefix with an s3:prefix condition."
  }

  # --- IAM: read-only engine and garbage collector ----------------------------

  assert {
    condition = sort(flatten([
      for s in jsondecode(aws_iam_policy.this["engine_readonly"].policy).Statement : s.Action
    ])) == tolist(["s3:GetObject", "s3:ListBucket"])
    error_message = "The read-only engine policy must allow exactly s3:GetObject and s3:ListBucket."
  }

  assert {
    condition = sort(flatten([
      for s in jsondecode(aws_iam_policy.this["gc"].policy).Statement : s.Action
      ])) == tolist([
      "s3:AbortMultipartUpload", "s3:DeleteObject", "s3:GetObject", "s3:ListBucket", "s3:ListBucketMultipartUploads",
    ])
    error_message = "The GC policy must allow read, list, delete and abort, and nothing else (no put)."
  }

  assert {
    condition = alltrue([
      for party in ["engine", "engine_readonly", "gc"] : !strcontains(aws_iam_policy.this[party].policy, "kms:")
    ])
    error_message = "No KMS permissions without a KMS key."
  }

  # --- roles and outputs -----------------------------------------------------

  assert {
    condition     = length(aws_iam_role.this) == 0 && output.engine_role_arn == null && output.gc_role_arn == null
    error_message = "No role may be created unless asked for."
  }

  assert {
    condition = jsondecode(output.kv_transfer_config) == {
      kv_connector = "S3KVConnector"
      kv_role      = "kv_both"
      kv_connector_extra_config = {
        bucket = "s3kv-unit-test"
        prefix = "s3kv"
        region = "us-east-1"
      }
    }
    error_message = "kv_transfer_config must point the S3KVConnector at the bucket, prefix and region."
  }

  assert {
    condition     = output.bucket_name == "s3kv-unit-test" && output.bucket_arn == "arn:aws:s3:::s3kv-unit-test"
    error_message = "bucket_name / bucket_arn outputs are wrong."
  }
}

run "kms_key_and_expiry" {
  command = plan

  variables {
    prefix            = "team-a/kv"
    kms_key_arn       = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    expire_after_days = 7
  }

  assert {
    condition = (
      one(aws_s3_bucket_server_side_encryption_configuration.this[0].rule).apply_server_side_encryption_by_default[0].sse_algorithm == "aws:kms" &&
      one(aws_s3_bucket_server_side_encryption_configuration.this[0].rule).apply_server_side_encryption_by_default[0].kms_master_key_id == var.kms_key_arn &&
      one(aws_s3_bucket_server_side_encryption_configuration.this[0].rule).bucket_key_enabled == true
    )
    error_message = "With a KMS key, default encryption must be SSE-KMS with bucket keys."
  }

  assert {
    condition = length([
      for r in aws_s3_bucket_lifecycle_configuration.this.rule : r
      if r.status == "Enabled" && try(r.expiration[0].days, 0) == 7 && try(r.filter[0].prefix, "") == "team-a/kv/"
    ]) == 1
    error_message = "expire_after_days must expire everything under <prefix>/."
  }

  assert {
    condition = sort(flatten([
      for s in jsondecode(aws_iam_policy.this["engine"].policy).Statement : s.Action if s.Resource == [var.kms_key_arn]
    ])) == tolist(["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"])
    error_message = "The engine must be able to use the KMS key."
  }

  assert {
    condition = alltrue([
      for party in ["engine_readonly", "gc"] : sort(flatten([
        for s in jsondecode(aws_iam_policy.this[party].policy).Statement : s.Action if s.Resource == [var.kms_key_arn]
      ])) == tolist(["kms:Decrypt"])
    ])
    error_message = "Readers (read-only engine, GC) only need kms:Decrypt."
  }

  assert {
    condition = alltrue([
      for s in jsondecode(aws_iam_policy.this["engine"].policy).Statement :
      s.Condition.StringEquals["kms:ViaService"] == "s3.us-east-1.amazonaws.com" if s.Resource == [var.kms_key_arn]
    ])
    error_message = "KMS use must be limited to S3 (kms:ViaService)."
  }

  assert {
    condition = alltrue([
      for s in jsondecode(aws_iam_policy.this["engine"].policy).Statement :
      s.Resource == ["arn:aws:s3:::s3kv-unit-test/team-a/kv/*"]
      if contains(s.Action, "s3:PutObject")
    ])
    error_message = "Object access must follow the prefix."
  }
}

run "roles_when_requested" {
  command = apply

  variables {
    roles = {
      engine = {
        trusted_principal_arns = ["arn:aws:iam::123456789012:role/vllm-node"]
      }
      gc = {
        assume_role_policy = "{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Action\":\"sts:AssumeRoleWithWebIdentity\",\"Principal\":{\"Federated\":\"arn:aws:iam::123456789012:oidc-provider/example\"}}]}"
      }
    }
  }

  assert {
    condition     = sort(keys(aws_iam_role.this)) == tolist(["engine", "gc"])
    error_message = "Roles must be created exactly for the parties given."
  }

  assert {
    condition     = jsondecode(aws_iam_role.this["engine"].assume_role_policy).Statement[0].Principal.AWS == ["arn:aws:iam::123456789012:role/vllm-node"]
    error_message = "The engine role must trust the given principals."
  }

  assert {
    condition     = aws_iam_role.this["gc"].assume_role_policy == var.roles.gc.assume_role_policy
    error_message = "A given assume_role_policy must be used verbatim."
  }

  assert {
    condition = (
      aws_iam_role_policy_attachment.this["engine"].policy_arn == aws_iam_policy.this["engine"].arn &&
      aws_iam_role_policy_attachment.this["gc"].policy_arn == aws_iam_policy.this["gc"].arn
    )
    error_message = "Each role must get its own party's policy."
  }

  assert {
    condition     = output.engine_role_arn != null && output.gc_role_arn != null && output.engine_readonly_role_arn == null
    error_message = "Role ARN outputs must be set exactly for created roles."
  }
}
